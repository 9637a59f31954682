//! Hand-driven tests of one or a few [`Averager`]s: every rule, message by message.

use super::*;
use crate::rng::Rng;
use crate::tensor::{quantize, split_ranges, Bytes, Encoding};

/// Every kind of encoding, top-k included (which averaging must refuse).
const ENCODINGS: [Encoding; 5] = [
    Encoding::F32,
    Encoding::F16,
    Encoding::Bf16,
    Encoding::Int8 { block: 2 },
    Encoding::TopK { k: 2 },
];

fn id(n: u8) -> NodeId {
    NodeId([n; 32])
}
const A: u8 = 1;
const B: u8 = 2;
const C: u8 = 3;
const D: u8 = 4;

/// `from`'s `Join`, with its (open) proof.
fn join(from: NodeId, round: u64, len: u64) -> AvgMessage {
    AvgMessage::Join {
        round,
        len,
        proof: OpenJoinProofs.attest(from, round, len),
    }
}

/// A `Group` listing `members`, each with its (open) join proof, signed by
/// its leader (the first member).
fn group(round: u64, len: u64, members: Vec<NodeId>) -> AvgMessage {
    let proofs: Vec<Bytes> = members
        .iter()
        .map(|&m| OpenJoinProofs.attest(m, round, len))
        .collect();
    // (A Group with no members is invalid; sign one anyway for tests that send it.)
    let leader = members.first().copied().unwrap_or(NodeId([0; 32]));
    let signature = OpenJoinProofs.sign_group(leader, round, len, &members, &proofs);
    AvgMessage::Group {
        round,
        len,
        members,
        proofs,
        signature,
    }
}

fn averager(me: NodeId, config: AveragingConfig) -> Averager {
    Averager::new(me, config, Box::new(OpenJoinProofs))
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn cfg() -> AveragingConfig {
    AveragingConfig::default()
}

fn node(me: u8, peers: &[u8]) -> Averager {
    let mut a = averager(id(me), cfg());
    let view: Vec<NodeId> = peers.iter().map(|&p| id(p)).collect();
    a.set_peers(&view);
    a
}

/// One averager per id with `config`, each seeing all of them.
fn swarm(ids: &[u8], config: &AveragingConfig) -> Vec<Averager> {
    let view: Vec<NodeId> = ids.iter().map(|&p| id(p)).collect();
    ids.iter()
        .map(|&me| {
            let mut a = averager(id(me), config.clone());
            a.set_peers(&view);
            a
        })
        .collect()
}

fn transmits(a: &mut Averager) -> Vec<Transmit> {
    std::iter::from_fn(|| a.poll_transmit()).collect()
}

fn events(a: &mut Averager) -> Vec<AvgEvent> {
    std::iter::from_fn(|| a.poll_event()).collect()
}

fn rejections(events: &[AvgEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            AvgEvent::Rejected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

fn finished(events: &[AvgEvent]) -> Vec<RoundOutcome> {
    events
        .iter()
        .filter_map(|e| match e {
            AvgEvent::Finished(o) => Some(o.clone()),
            _ => None,
        })
        .collect()
}

/// The exact mean the protocol promises: f64 sum in the given order, divide, cast.
fn mean(vectors: &[&[f32]]) -> Vec<f32> {
    let len = vectors.first().map_or(0, |v| v.len());
    (0..len)
        .map(|i| {
            let s: f64 = vectors.iter().map(|v| f64::from(v[i])).sum();
            (s / vectors.len() as f64) as f32
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A payload with a correct digest over arbitrary (e.g. NaN) bytes.
fn forged(values: &[f32]) -> Payload {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Payload {
        len: values.len() as u32,
        encoding: Encoding::F32,
        digest: *blake3::hash(&bytes).as_bytes(),
        bytes: Bytes::from(bytes),
    }
}

/// Delivers every transmit immediately (at `now`) until all nodes are quiet.
fn pump(nodes: &mut [Averager], now: Duration) -> Vec<Vec<AvgEvent>> {
    pump_losing(nodes, now, |_, _| false)
}

/// [`pump`], losing the transmits of node `i` for which `lost(i, t)` holds.
fn pump_losing(
    nodes: &mut [Averager],
    now: Duration,
    lost: impl Fn(usize, &Transmit) -> bool,
) -> Vec<Vec<AvgEvent>> {
    pump_holding(nodes, now, lost).0
}

/// [`pump`], holding back the transmits of node `i` for which `hold(i, t)`
/// holds; returns the events and what was held back (sender index first).
fn pump_holding(
    nodes: &mut [Averager],
    now: Duration,
    hold: impl Fn(usize, &Transmit) -> bool,
) -> (Vec<Vec<AvgEvent>>, Vec<(usize, Transmit)>) {
    let mut evs: Vec<Vec<AvgEvent>> = vec![Vec::new(); nodes.len()];
    let mut held = Vec::new();
    loop {
        let mut pending = Vec::new();
        for (i, n) in nodes.iter_mut().enumerate() {
            for t in transmits(n) {
                if hold(i, &t) {
                    held.push((i, t));
                } else {
                    pending.push((i, t));
                }
            }
            evs[i].extend(events(n));
        }
        if pending.is_empty() {
            return (evs, held);
        }
        deliver(nodes, now, pending);
    }
}

/// Hands each transmit (sender index first) to the nodes it is addressed to, at `now`.
fn deliver(nodes: &mut [Averager], now: Duration, pending: Vec<(usize, Transmit)>) {
    for (from, t) in pending {
        let sender = nodes[from].me();
        for (to, n) in nodes.iter_mut().enumerate() {
            let addressed = match t.to {
                Destination::Broadcast => to != from,
                Destination::Peer(p) => p == n.me(),
            };
            if addressed {
                n.handle_message(now, sender, t.msg.clone());
            }
        }
    }
}

/// A, B and C, each seeing all three, matchmaking `round` at time 0 with
/// `vals` (in that order).
fn trio_in_round(round: u64, vals: &[Vec<f32>; 3]) -> Vec<Averager> {
    let mut nodes: Vec<Averager> = [A, B, C].iter().map(|&m| node(m, &[A, B, C])).collect();
    for (n, v) in nodes.iter_mut().zip(vals) {
        n.start_round(ms(0), round, v.clone()).expect("start");
    }
    nodes
}

/// Advances virtual time to the earliest timer of `nodes` and fires it on
/// every node; returns that time.
fn fire_next_timeout(nodes: &mut [Averager]) -> Duration {
    let now = nodes
        .iter()
        .filter_map(Averager::poll_timeout)
        .min()
        .expect("a timer while a round is in flight");
    for n in nodes.iter_mut() {
        n.handle_timeout(now);
    }
    now
}

/// Fires timers on `nodes` until each has finished a round, adding what
/// they emit to `evs` (one list per node); every timer must fire by `latest`.
fn fire_until_all_finished(nodes: &mut [Averager], evs: &mut [Vec<AvgEvent>], latest: Duration) {
    while evs.iter().any(|e| finished(e).is_empty()) {
        let now = fire_next_timeout(nodes);
        assert!(now <= latest, "a timer at {now:?}, after {latest:?}");
        for (e, more) in evs.iter_mut().zip(pump(nodes, now)) {
            e.extend(more);
        }
    }
}

/// Node A (the smallest id) with peers B and C, grouped with both: returns A and the
/// transmits of the group formation.
fn leader_with_group(values: Vec<f32>) -> (Averager, Vec<Transmit>) {
    let mut a = node(A, &[A, B, C]);
    a.start_round(ms(0), 1, values.clone()).expect("start");
    let len = values.len() as u64;
    a.handle_message(ms(5), id(B), join(id(B), 1, len));
    a.handle_message(ms(6), id(C), join(id(C), 1, len));
    let t = transmits(&mut a);
    let evs = events(&mut a);
    assert!(evs.contains(&AvgEvent::GroupFormed {
        round: 1,
        members: vec![id(A), id(B), id(C)]
    }));
    (a, t)
}

#[test]
fn start_round_refuses_in_flight_stale_and_non_finite() {
    let mut a = node(A, &[B]);
    assert_eq!(
        a.start_round(ms(0), 1, vec![1.0, f32::NAN]),
        Err(AveragingError::NonFinite { index: 1 })
    );
    assert_eq!(a.in_flight(), None);
    a.start_round(ms(0), 3, vec![1.0]).expect("start");
    assert_eq!(a.in_flight(), Some(3));
    assert_eq!(
        a.start_round(ms(1), 4, vec![1.0]),
        Err(AveragingError::InFlight { round: 3 })
    );
    a.handle_timeout(ms(2_000)); // leader alone at the window: finishes
    assert_eq!(a.in_flight(), None);
    assert_eq!(a.last_finished(), Some(3));
    for r in [2, 3] {
        assert_eq!(
            a.start_round(ms(2_001), r, vec![1.0]),
            Err(AveragingError::Stale { round: r, last: 3 })
        );
    }
    assert!(a.start_round(ms(2_001), 4, vec![1.0]).is_ok());
}

#[test]
fn no_peers_finishes_at_once_alone() {
    let mut a = node(A, &[A]);
    a.start_round(ms(0), 1, vec![1.0, 2.0]).expect("start");
    let evs = events(&mut a);
    assert_eq!(
        evs,
        vec![
            AvgEvent::GroupFormed {
                round: 1,
                members: vec![id(A)]
            },
            AvgEvent::Finished(RoundOutcome {
                round: 1,
                group: vec![id(A)],
                values: vec![1.0, 2.0],
                parts: vec![PartOutcome {
                    range: 0..2,
                    contributors: vec![id(A)],
                    averaged: false
                }],
                dropped: vec![],
            })
        ]
    );
    assert_eq!(a.in_flight(), None);
    assert_eq!(a.poll_timeout(), None);
}

#[test]
fn three_peers_average_exactly_and_each_finishes_once() {
    let vals = [
        vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
        vec![-1.0, 1e-3, 3.3, 1e7, -5.5, 0.0, 2.25],
    ];
    let mut nodes = trio_in_round(7, &vals);
    let evs = pump(&mut nodes, ms(1));
    let refs: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
    let want = mean(&refs);
    for (n, e) in nodes.iter().zip(&evs) {
        assert!(rejections(e).is_empty(), "{e:?}");
        let done = finished(e);
        assert_eq!(done.len(), 1);
        let o = &done[0];
        assert_eq!(o.group, vec![id(A), id(B), id(C)]);
        assert_eq!(bits(&o.values), bits(&want));
        assert!(o
            .parts
            .iter()
            .all(|p| p.averaged && p.contributors == o.group));
        assert_eq!(
            o.parts.iter().map(|p| p.range.clone()).collect::<Vec<_>>(),
            split_ranges(7, 3)
        );
        assert!(o.dropped.is_empty());
        assert_eq!(n.in_flight(), None);
        assert_eq!(n.poll_timeout(), None);
    }
}

#[test]
fn non_leader_re_joins_then_gives_up_alone_after_group_timeout() {
    let mut b = node(B, &[A, B]);
    b.start_round(ms(0), 1, vec![4.0; 3]).expect("start");
    b.handle_message(ms(3), id(A), join(id(A), 1, 3));
    let mut joins = 0;
    let mut now = ms(0);
    loop {
        joins += transmits(&mut b)
            .iter()
            .filter(|t| t.to == Destination::Broadcast && matches!(t.msg, AvgMessage::Join { .. }))
            .count();
        if b.in_flight().is_none() {
            break;
        }
        let next = b.poll_timeout().expect("a timer while in flight");
        assert!(next > now, "timer did not advance");
        now = next;
        b.handle_timeout(now);
    }
    assert_eq!(now, ms(7_000), "gives up at join_window + group_timeout");
    // Joins at 0, 0.5, ..., 6.5 s.
    assert_eq!(joins, 14);
    let done = finished(&events(&mut b));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].group, vec![id(B)]);
    assert_eq!(done[0].values, vec![4.0; 3]);
    assert!(!done[0].parts[0].averaged);
}

#[test]
fn group_not_listing_me_finishes_alone_at_once() {
    let mut c = node(C, &[A, B, C]);
    c.start_round(ms(0), 1, vec![1.0]).expect("start");
    c.handle_message(ms(10), id(A), group(1, 1, vec![id(A), id(B)]));
    let done = finished(&events(&mut c));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].group, vec![id(C)]);
    assert_eq!(c.in_flight(), None);
}

#[test]
fn peers_a_leader_leaves_out_regroup_without_it() {
    // A (the smallest id) leads and sends a Group of itself alone, leaving
    // out B and C though both joined: they average as a pair instead of
    // each finishing alone.
    let mut nodes = swarm(&[A, B, C], &cfg());
    for n in nodes.iter_mut() {
        n.start_round(ms(0), 1, vec![1.0; 4]).unwrap();
    }
    let exclude_all = group(1, 4, vec![id(A)]);
    let (b, c) = (nodes[1].me(), nodes[2].me());
    let mut rest = nodes.split_off(1);
    // A's own Join and its hostile Group reach B and C; A hears nothing.
    for n in rest.iter_mut() {
        n.handle_message(ms(1), id(A), join(id(A), 1, 4));
        n.handle_message(ms(2), id(A), exclude_all.clone());
    }
    let evs = pump(&mut rest, ms(3));
    for (i, e) in evs.iter().enumerate() {
        let done = finished(e);
        assert_eq!(done.len(), 1, "node {i}: {e:?}");
        assert_eq!(done[0].group, vec![b, c]);
        assert!(done[0].parts.iter().all(|p| p.averaged));
    }
}

#[test]
fn a_leader_listing_a_member_that_never_joined_is_set_aside() {
    // A (the smallest id) leads and lists D, a peer that never joined round
    // 1: made up, or with a proof of another round. B and C refuse the
    // Group and regroup without A at once, instead of sending D parts and
    // waiting for it until the reduce deadline.
    let forged = Bytes::from(vec![9; 32]);
    let other_round = OpenJoinProofs.attest(id(D), 2, 4);
    for phantom_proof in [forged, other_round] {
        let mut nodes = swarm(&[A, B, C], &cfg());
        for n in nodes.iter_mut() {
            n.start_round(ms(0), 1, vec![1.0; 4]).unwrap();
        }
        let AvgMessage::Group {
            members,
            mut proofs,
            signature,
            ..
        } = group(1, 4, vec![id(A), id(B), id(C), id(D)])
        else {
            unreachable!()
        };
        proofs[3] = phantom_proof;
        let hostile = AvgMessage::Group {
            round: 1,
            len: 4,
            members,
            proofs,
            signature,
        };
        let (b, c) = (nodes[1].me(), nodes[2].me());
        let mut rest = nodes.split_off(1);
        for n in rest.iter_mut() {
            n.handle_message(ms(1), id(A), join(id(A), 1, 4));
            n.handle_message(ms(2), id(A), hostile.clone());
        }
        let evs = pump(&mut rest, ms(3));
        for (i, e) in evs.iter().enumerate() {
            let refused = rejections(e);
            assert_eq!(refused.len(), 1, "node {i}: {e:?}");
            assert!(
                refused[0].contains(&id(D).to_string()) && refused[0].contains("proof"),
                "{refused:?}"
            );
            let done = finished(e);
            assert_eq!(done.len(), 1, "node {i}: {e:?}");
            assert_eq!(done[0].group, vec![b, c]);
            assert!(done[0].parts.iter().all(|p| p.averaged));
        }
        // A sits out the next two rounds: not waited for, its Groups refused.
        for n in &rest {
            assert_eq!(n.sitting_out(2), vec![id(A)]);
            assert_eq!(n.sitting_out(3), vec![id(A)]);
            assert!(n.sitting_out(4).is_empty());
        }
    }
}

#[test]
fn a_join_without_a_valid_proof_is_refused_and_never_listed() {
    let mut a = node(A, &[B, C]);
    a.start_round(ms(0), 1, vec![1.0; 4]).unwrap();
    // B's Join carries C's proof; C's is its own.
    let stolen = AvgMessage::Join {
        round: 1,
        len: 4,
        proof: OpenJoinProofs.attest(id(C), 1, 4),
    };
    a.handle_message(ms(1), id(B), stolen);
    assert_eq!(rejections(&events(&mut a)).len(), 1);
    a.handle_message(ms(2), id(C), join(id(C), 1, 4));
    // The window closes without B: the Group lists A and C, with their proofs.
    a.handle_timeout(cfg().join_window);
    let sent = transmits(&mut a);
    assert!(
        sent.contains(&Transmit {
            to: Destination::Broadcast,
            msg: group(1, 4, vec![id(A), id(C)]),
        }),
        "{sent:?}"
    );
}

#[test]
fn group_from_a_non_leader_or_with_other_len_is_rejected_and_ignored() {
    let mut c = node(C, &[A, B, C]);
    c.start_round(ms(0), 1, vec![1.0]).expect("start");
    // B leads a group of its own making, listing A first: not signed by A.
    let AvgMessage::Group {
        members, proofs, ..
    } = group(1, 1, vec![id(A), id(B), id(C)])
    else {
        unreachable!()
    };
    let signature = OpenJoinProofs.sign_group(id(B), 1, 1, &members, &proofs);
    let not_as = AvgMessage::Group {
        round: 1,
        len: 1,
        members,
        proofs,
        signature,
    };
    c.handle_message(ms(10), id(B), not_as);
    c.handle_message(ms(11), id(A), group(1, 2, vec![id(A), id(C)]));
    let evs = events(&mut c);
    assert_eq!(rejections(&evs).len(), 2, "{evs:?}");
    assert_eq!(c.in_flight(), Some(1));
    // The real leader's Group is then followed.
    c.handle_message(ms(12), id(A), group(1, 1, vec![id(A), id(C)]));
    assert!(events(&mut c).contains(&AvgEvent::GroupFormed {
        round: 1,
        members: vec![id(A), id(C)]
    }));
    // A later Group of another leader, or the same again, changes nothing:
    // the first one wins.
    c.handle_message(ms(13), id(B), group(1, 1, vec![id(B), id(C)]));
    c.handle_message(ms(13), id(A), group(1, 1, vec![id(A), id(C)]));
    assert!(events(&mut c).is_empty());
    // A different one its leader signed too proves the leader split the
    // round: it sits out from the next round, and the group stays.
    c.handle_message(ms(14), id(A), group(1, 1, vec![id(A), id(B), id(C)]));
    let evs = events(&mut c);
    assert_eq!(rejections(&evs).len(), 1, "{evs:?}");
    assert!(rejections(&evs)[0].contains("signed two different Groups"));
    assert!(c.sit_outs.sits_out(id(A), 2));
    // Nothing A sends this round counts, so C, alone in [A, C], is done.
    assert_eq!(c.in_flight(), None);
    let done = finished(&evs);
    assert_eq!(done.len(), 1, "{evs:?}");
    assert_eq!(done[0].dropped, vec![id(A)]);
    assert!(
        done[0].parts.iter().all(|p| p.contributors == vec![id(C)]),
        "{:?}",
        done[0]
    );
}

#[test]
fn leader_closes_at_window_and_re_sends_group_to_late_joiners() {
    let mut a = node(A, &[A, B, C]);
    a.start_round(ms(0), 1, vec![1.0; 4]).expect("start");
    a.handle_message(ms(5), id(B), join(id(B), 1, 4));
    assert!(!transmits(&mut a)
        .iter()
        .any(|t| matches!(t.msg, AvgMessage::Group { .. })));
    assert_eq!(a.poll_timeout(), Some(ms(500)));
    a.handle_timeout(ms(500));
    a.handle_timeout(ms(1_000));
    a.handle_timeout(ms(1_500));
    assert_eq!(a.poll_timeout(), Some(ms(2_000)), "window end");
    a.handle_timeout(ms(2_000));
    let group = group(1, 4, vec![id(A), id(B)]);
    assert!(transmits(&mut a).contains(&Transmit {
        to: Destination::Broadcast,
        msg: group.clone()
    }));
    // C was late: its Join gets the Group (without C) so it stops waiting.
    a.handle_message(ms(2_100), id(C), join(id(C), 1, 4));
    assert_eq!(
        transmits(&mut a),
        vec![Transmit {
            to: Destination::Peer(id(C)),
            msg: group.clone()
        }]
    );
    // B lost the Group: its repeated Join gets it too.
    a.handle_message(ms(2_200), id(B), join(id(B), 1, 4));
    assert_eq!(
        transmits(&mut a),
        vec![Transmit {
            to: Destination::Peer(id(B)),
            msg: group.clone()
        }]
    );
    // A peer repeating its Join fast gets the Group at most twice per Join
    // re-broadcast interval, not once per Join.
    for i in 0..100 {
        a.handle_message(
            ms(2_110) + Duration::from_micros(i * 10),
            id(C),
            join(id(C), 1, 4),
        );
    }
    assert!(
        transmits(&mut a).is_empty(),
        "answered Joins right after the last answer"
    );
    let half = cfg().join_retry() / 2;
    a.handle_message(ms(2_100) + half, id(C), join(id(C), 1, 4));
    assert_eq!(
        transmits(&mut a),
        vec![Transmit {
            to: Destination::Peer(id(C)),
            msg: group
        }]
    );
}

#[test]
fn reducer_validates_parts_and_first_contribution_wins() {
    let own = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
    let (mut a, formed) = leader_with_group(own.clone());
    // A sends B's part (3..6) to B and C's part (6..9) to C.
    let parts: Vec<&Transmit> = formed
        .iter()
        .filter(|t| matches!(t.msg, AvgMessage::Part { .. }))
        .collect();
    assert_eq!(parts.len(), 2);
    assert!(formed.contains(&Transmit {
        to: Destination::Peer(id(B)),
        msg: AvgMessage::Part {
            round: 1,
            part: 1,
            payload: Payload::from_f32(&own[3..6])
        }
    }));
    let part = |part: u32, payload: Payload| AvgMessage::Part {
        round: 1,
        part,
        payload,
    };
    let mut bad_digest = Payload::from_f32(&[1.0, 1.0, 1.0]);
    bad_digest.digest[0] ^= 1;
    let bad = [
        (D, part(0, Payload::from_f32(&[1.0; 3]))),
        (B, part(1, Payload::from_f32(&[1.0; 3]))),
        (B, part(0, Payload::from_f32(&[1.0; 2]))),
        (B, part(0, bad_digest)),
        (B, part(0, forged(&[1.0, f32::NAN, 1.0]))),
        (B, part(0, forged(&[1.0, f32::INFINITY, 1.0]))),
    ];
    for (from, msg) in bad {
        a.handle_message(ms(10), id(from), msg.clone());
        let evs = events(&mut a);
        assert_eq!(rejections(&evs).len(), 1, "not rejected: {msg:?}");
        assert!(transmits(&mut a).is_empty());
    }
    let b_vals = [10.0f32, 20.0, 30.0];
    let c_vals = [0.5f32, 0.25, -0.125];
    a.handle_message(ms(11), id(B), part(0, Payload::from_f32(&b_vals)));
    a.handle_message(ms(12), id(B), part(0, Payload::from_f32(&[99.0; 3])));
    assert!(
        transmits(&mut a).is_empty(),
        "no result before C contributes"
    );
    a.handle_message(ms(13), id(C), part(0, Payload::from_f32(&c_vals)));
    let want = mean(&[&own[0..3], &b_vals, &c_vals]);
    let reduced = AvgMessage::Reduced {
        round: 1,
        part: 0,
        contributors: vec![id(A), id(B), id(C)],
        payload: Payload::from_f32(&want),
    };
    assert_eq!(
        transmits(&mut a),
        vec![
            Transmit {
                to: Destination::Peer(id(B)),
                msg: reduced.clone()
            },
            Transmit {
                to: Destination::Peer(id(C)),
                msg: reduced.clone()
            },
        ]
    );
    assert!(rejections(&events(&mut a)).is_empty());
    // A repeat Part after reduction is answered with the result again.
    a.handle_message(ms(14), id(C), part(0, Payload::from_f32(&c_vals)));
    assert_eq!(
        transmits(&mut a),
        vec![Transmit {
            to: Destination::Peer(id(C)),
            msg: reduced
        }]
    );
}

#[test]
fn member_validates_reduced_and_finishes_with_all_parts() {
    let own = vec![1.0f32; 9];
    let (mut a, _) = leader_with_group(own.clone());
    for from in [B, C] {
        a.handle_message(
            ms(10),
            id(from),
            AvgMessage::Part {
                round: 1,
                part: 0,
                payload: Payload::from_f32(&[3.0; 3]),
            },
        );
    }
    let _ = transmits(&mut a);
    let reduced = |part: u32, contributors: &[u8], values: &[f32]| AvgMessage::Reduced {
        round: 1,
        part,
        contributors: contributors.iter().map(|&c| id(c)).collect(),
        payload: Payload::from_f32(values),
    };
    let bad = [
        (C, reduced(1, &[A, B, C], &[2.0; 3])), // C does not reduce part 1
        (B, reduced(5, &[A, B, C], &[2.0; 3])), // no part 5 in a group of 3
        (B, reduced(0, &[A, B, C], &[2.0; 3])), // part 0 is ours (reducer check)
        (B, reduced(1, &[A, B, D], &[2.0; 3])), // D is no member
        (B, reduced(1, &[A, C], &[2.0; 3])),    // omits its reducer
        (B, reduced(1, &[A, B, C], &[2.0; 4])), // wrong length
        (B, reduced(1, &[C, B], &[2.0; 3])),    // unsorted
        (D, reduced(3, &[D], &[2.0; 3])),       // stranger, part out of range
        // Not finite (its digest is right): refused before a value is placed, so the
        // part is not marked done and C's valid result below still counts.
        (C, reduced(2, &[A, B, C], &[-1.0, -1.0, f32::NAN])),
    ];
    for (from, msg) in bad {
        a.handle_message(ms(20), id(from), msg.clone());
        assert_eq!(
            rejections(&events(&mut a)).len(),
            1,
            "not rejected: {msg:?}"
        );
    }
    assert_eq!(a.in_flight(), Some(1));
    a.handle_message(ms(21), id(B), reduced(1, &[B, C], &[2.0; 3]));
    a.handle_message(ms(22), id(B), reduced(1, &[A, B, C], &[7.0; 3])); // duplicate: ignored
    assert_eq!(a.in_flight(), Some(1));
    a.handle_message(ms(23), id(C), reduced(2, &[A, B, C], &[-1.0; 3]));
    let evs = events(&mut a);
    assert!(rejections(&evs).is_empty(), "{evs:?}");
    let done = finished(&evs);
    assert_eq!(done.len(), 1);
    let o = &done[0];
    let mut want = vec![(1.0 + 3.0 + 3.0) / 3.0f32; 3];
    want.extend([2.0; 3]);
    want.extend([-1.0; 3]);
    assert_eq!(bits(&o.values), bits(&want));
    assert_eq!(o.parts[1].contributors, vec![id(B), id(C)]);
    assert_eq!(o.dropped, Vec::<NodeId>::new(), "A itself is never dropped");
    // Late messages of the finished round change nothing.
    a.handle_message(ms(24), id(C), reduced(2, &[A, B, C], &[5.0; 3]));
    assert!(events(&mut a).is_empty());
    // But a late Part is re-acked from the kept result, only to members of that group.
    let part = AvgMessage::Part {
        round: 1,
        part: 0,
        payload: Payload::from_f32(&[3.0; 3]),
    };
    a.handle_message(ms(25), id(B), part.clone());
    let t = transmits(&mut a);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].to, Destination::Peer(id(B)));
    assert!(matches!(t[0].msg, AvgMessage::Reduced { part: 0, .. }));
    a.handle_message(ms(26), id(D), part);
    assert!(transmits(&mut a).is_empty());
}

#[test]
fn parts_are_retransmitted_until_acked_and_deadlines_drop_silent_members() {
    let own: Vec<f32> = (0..9).map(|i| i as f32).collect();
    let (mut a, _) = leader_with_group(own.clone());
    let parts_to = |t: &[Transmit]| -> Vec<Destination> {
        t.iter()
            .filter(|t| matches!(t.msg, AvgMessage::Part { .. }))
            .map(|t| t.to.clone())
            .collect()
    };
    // Group formed at 6 ms: re-sends at 506 ms.
    assert_eq!(a.poll_timeout(), Some(ms(506)));
    a.handle_timeout(ms(506));
    assert_eq!(
        parts_to(&transmits(&mut a)),
        vec![Destination::Peer(id(B)), Destination::Peer(id(C))]
    );
    // B acks part 1 and contributes to part 0; C stays silent.
    a.handle_message(
        ms(600),
        id(B),
        AvgMessage::Reduced {
            round: 1,
            part: 1,
            contributors: vec![id(A), id(B)],
            payload: Payload::from_f32(&[0.5; 3]),
        },
    );
    a.handle_message(
        ms(601),
        id(B),
        AvgMessage::Part {
            round: 1,
            part: 0,
            payload: Payload::from_f32(&[2.0; 3]),
        },
    );
    a.handle_timeout(ms(1_006));
    assert_eq!(parts_to(&transmits(&mut a)), vec![Destination::Peer(id(C))]);
    // Reducer deadline: 6 ms + 7.5 s.
    let mut now = ms(1_006);
    while now < ms(7_506) {
        now = a.poll_timeout().expect("timer");
        a.handle_timeout(now);
    }
    assert_eq!(now, ms(7_506));
    let t = transmits(&mut a);
    let reduced: Vec<&Transmit> = t
        .iter()
        .filter(|t| matches!(t.msg, AvgMessage::Reduced { .. }))
        .collect();
    assert_eq!(reduced.len(), 2, "result goes to every other member");
    let want0 = mean(&[&own[0..3], &[2.0; 3]]);
    assert_eq!(
        reduced[0].msg,
        AvgMessage::Reduced {
            round: 1,
            part: 0,
            contributors: vec![id(A), id(B)],
            payload: Payload::from_f32(&want0)
        }
    );
    assert_eq!(a.in_flight(), Some(1));
    // No re-sends after the reduce deadline: the round just ends at 10.006 s.
    while a.in_flight().is_some() {
        now = a.poll_timeout().expect("timer");
        a.handle_timeout(now);
    }
    assert_eq!(now, ms(10_006));
    let done = finished(&events(&mut a));
    assert_eq!(done.len(), 1);
    let o = &done[0];
    let mut want = want0.clone();
    want.extend([0.5; 3]);
    want.extend_from_slice(&own[6..9]);
    assert_eq!(bits(&o.values), bits(&want));
    assert_eq!(
        o.parts.iter().map(|p| p.averaged).collect::<Vec<_>>(),
        vec![true, true, false]
    );
    assert_eq!(o.parts[2].contributors, vec![id(A)]);
    assert_eq!(o.dropped, vec![id(C)]);
}

#[test]
fn joins_for_future_rounds_are_buffered_and_bounded() {
    let mut a = node(A, &[A, B, C]);
    a.handle_message(ms(0), id(B), join(id(B), 1, 2));
    a.handle_message(ms(0), id(C), join(id(C), 1, 2));
    a.start_round(ms(1), 1, vec![1.0, 2.0]).expect("start");
    // Everyone already joined: the leader closes within start_round.
    assert!(transmits(&mut a).contains(&Transmit {
        to: Destination::Broadcast,
        msg: group(1, 2, vec![id(A), id(B), id(C)])
    }));
    // While round 1 runs: round 5 is 4 ahead (buffered), round 6 is too far.
    a.handle_message(ms(2), id(B), join(id(B), 5, 2));
    assert!(events(&mut a)
        .iter()
        .all(|e| !matches!(e, AvgEvent::Rejected { .. })));
    a.handle_message(ms(2), id(C), join(id(C), 6, 2));
    assert_eq!(rejections(&events(&mut a)).len(), 1);
    // Joins for the current or older rounds are not buffered (and not rejected).
    a.handle_message(ms(3), id(B), join(id(B), 1, 2));
    a.handle_message(ms(3), id(B), join(id(B), 0, 2));
    assert!(events(&mut a).is_empty());
    assert_eq!(a.joins.rounds(), 1);
}

#[test]
fn join_with_another_length_is_rejected_and_not_counted() {
    let mut a = node(A, &[A, B]);
    a.start_round(ms(0), 1, vec![1.0; 4]).expect("start");
    a.handle_message(ms(1), id(B), join(id(B), 1, 5));
    assert_eq!(rejections(&events(&mut a)).len(), 1);
    assert!(!transmits(&mut a)
        .iter()
        .any(|t| matches!(t.msg, AvgMessage::Group { .. })));
    a.handle_message(ms(2), id(B), join(id(B), 1, 4));
    assert!(transmits(&mut a)
        .iter()
        .any(|t| matches!(t.msg, AvgMessage::Group { .. })));
}

#[test]
fn shrinking_the_view_lets_the_leader_close_early() {
    let mut a = node(A, &[A, B, C]);
    a.start_round(ms(0), 1, vec![1.0; 4]).expect("start");
    a.handle_message(ms(100), id(B), join(id(B), 1, 4));
    assert_eq!(a.poll_timeout(), Some(ms(500)));
    a.set_peers(&[id(A), id(B)]);
    assert_eq!(a.poll_timeout(), Some(ms(100)), "re-check now");
    a.handle_timeout(ms(100));
    assert!(events(&mut a).contains(&AvgEvent::GroupFormed {
        round: 1,
        members: vec![id(A), id(B)]
    }));
}

#[test]
fn max_group_size_keeps_the_smallest_ids() {
    let mut a = averager(
        id(A),
        AveragingConfig {
            max_group_size: 2,
            ..cfg()
        },
    );
    a.set_peers(&[id(B), id(C), id(D)]);
    a.start_round(ms(0), 1, vec![1.0]).expect("start");
    for p in [D, C, B] {
        a.handle_message(ms(1), id(p), join(id(p), 1, 1));
    }
    assert!(events(&mut a).contains(&AvgEvent::GroupFormed {
        round: 1,
        members: vec![id(A), id(B)]
    }));
}

#[test]
fn structurally_invalid_messages_are_rejected_and_own_messages_ignored() {
    let mut b = node(B, &[A, B, C]);
    b.start_round(ms(0), 1, vec![1.0]).expect("start");
    b.handle_message(ms(1), id(A), group(1, 1, vec![id(A), id(C), id(B)]));
    assert_eq!(rejections(&events(&mut b)).len(), 1);
    b.handle_message(ms(1), id(B), group(1, 1, vec![id(B)]));
    assert!(events(&mut b).is_empty());
    assert_eq!(b.in_flight(), Some(1));
}

/// Random, mostly invalid traffic must never panic nor finish a round twice.
#[test]
fn random_traffic_never_panics_or_finishes_twice() {
    let mut rng = Rng::new(99);
    let pool: Vec<NodeId> = (1..=6).map(id).collect();
    for trial in 0..40 {
        let me = pool[trial % pool.len()];
        let mut a = averager(
            me,
            AveragingConfig {
                join_window: ms(200),
                group_timeout: ms(300),
                reduce_timeout: ms(800),
                adaptive_deadline: trial % 2 == 0,
                retry_interval: ms(50),
                join_retry_interval: ms(50),
                max_group_size: 8,
                compression: ENCODINGS[trial % ENCODINGS.len()],
                sparse: trial % 3 == 0,
                aggregation: Aggregation::Mean,
                part_values: [1, 2, DEFAULT_PART_VALUES][trial % 3],
            },
        );
        a.set_peers(&pool);
        let mut now = ms(0);
        let mut started = 0u64;
        let mut finishes = 0u64;
        let mut round = 0u64;
        for _ in 0..600 {
            now += ms(rng.range(0..40));
            if a.in_flight().is_none() && rng.chance(0.3) {
                round += 1;
                a.start_round(now, round, vec![1.0; 6]).expect("start");
                started += 1;
            }
            let from = pool[rng.range(0..pool.len() as u64) as usize];
            let r = round.saturating_sub(1) + rng.range(0..3);
            let len = if rng.chance(0.8) { 6 } else { rng.range(0..9) };
            let mut members: Vec<NodeId> =
                pool.iter().copied().filter(|_| rng.chance(0.6)).collect();
            if rng.chance(0.1) {
                members.reverse();
            }
            let n = rng.range(0..9) as usize;
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.chance(0.05) {
                        f32::NAN
                    } else {
                        rng.next_f64() as f32
                    }
                })
                .collect();
            let mut payload = if rng.chance(0.5) {
                forged(&values)
            } else {
                let enc = ENCODINGS[rng.range(0..ENCODINGS.len() as u64) as usize];
                Payload::encode(&values, enc)
            };
            if rng.chance(0.1) {
                payload.digest[0] ^= 1;
            }
            if rng.chance(0.1) {
                payload.len += 1;
            }
            let msg = match rng.range(0..4) {
                0 => join(from, r, len),
                1 => group(r, len, members),
                2 => AvgMessage::Part {
                    round: r,
                    part: rng.range(0..8) as u32,
                    payload,
                },
                _ => AvgMessage::Reduced {
                    round: r,
                    part: rng.range(0..8) as u32,
                    contributors: members,
                    payload,
                },
            };
            a.handle_message(now, from, msg);
            if let Some(t) = a.poll_timeout() {
                if t <= now {
                    a.handle_timeout(now);
                }
            }
            let _ = transmits(&mut a);
            for e in events(&mut a) {
                if let AvgEvent::Finished(o) = e {
                    finishes += 1;
                    assert_eq!(o.values.len(), 6);
                    assert!(o.values.iter().all(|v| v.is_finite()));
                    assert!(o.group.contains(&me));
                }
            }
        }
        assert!(finishes <= started);
        assert!(finishes + 1 >= started, "a started round never finished");
    }
}

/// Three peers whose config uses `compression`, started with `vals` and pumped to the end.
fn run_three(compression: Encoding, vals: &[Vec<f32>]) -> (Vec<Averager>, Vec<Vec<AvgEvent>>) {
    let mut nodes: Vec<Averager> = [A, B, C]
        .iter()
        .map(|&m| {
            let mut a = averager(
                id(m),
                AveragingConfig {
                    compression,
                    ..cfg()
                },
            );
            a.set_peers(&[id(A), id(B), id(C)]);
            a
        })
        .collect();
    for (n, v) in nodes.iter_mut().zip(vals) {
        n.start_round(ms(0), 1, v.clone()).expect("start");
    }
    let evs = pump(&mut nodes, ms(1));
    (nodes, evs)
}

#[test]
fn compressed_rounds_send_compressed_payloads_and_average_the_decoded_values() {
    let vals = [
        vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, -8.0, 9.5],
        vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        vec![-1.0, 1e-3, 3.3, 1e3, -5.5, 0.0, 2.25, 1e-5, 77.0],
    ];
    for enc in [
        Encoding::F16,
        Encoding::Bf16,
        Encoding::Int8 { block: 2 },
        Encoding::Int8 { block: 64 },
    ] {
        let mut nodes: Vec<Averager> = [A, B, C]
            .iter()
            .map(|&m| {
                let mut a = averager(
                    id(m),
                    AveragingConfig {
                        compression: enc,
                        ..cfg()
                    },
                );
                a.set_peers(&[id(A), id(B), id(C)]);
                a
            })
            .collect();
        for (n, v) in nodes.iter_mut().zip(&vals) {
            n.start_round(ms(0), 1, v.clone()).expect("start");
        }
        // Every tensor message leaving a node uses the configured encoding.
        let mut evs: Vec<Vec<AvgEvent>> = vec![Vec::new(); 3];
        let mut now = ms(1);
        for _ in 0..10 {
            let mut pending = Vec::new();
            for (i, n) in nodes.iter_mut().enumerate() {
                for t in transmits(n) {
                    if let AvgMessage::Part { payload, .. } | AvgMessage::Reduced { payload, .. } =
                        &t.msg
                    {
                        assert_eq!(payload.encoding, enc, "{:?}", t.msg);
                    }
                    pending.push((i, t));
                }
                evs[i].extend(events(n));
            }
            for (from, t) in pending {
                let sender = nodes[from].me();
                for n in nodes.iter_mut() {
                    let addressed = match t.to {
                        Destination::Broadcast => n.me() != sender,
                        Destination::Peer(p) => p == n.me(),
                    };
                    if addressed {
                        n.handle_message(now, sender, t.msg.clone());
                    }
                }
            }
            now += ms(1);
        }
        // The protocol's result, recomputed: quantise each member's part except the
        // reducer's own (part j is reduced by member j, and A < B < C), f64 mean in member
        // order, cast, quantise the mean.
        let ranges = split_ranges(9, 3);
        let mut want = Vec::new();
        for (j, r) in ranges.iter().enumerate() {
            let q: Vec<Vec<f32>> = vals
                .iter()
                .enumerate()
                .map(|(k, v)| {
                    let part = &v[r.clone()];
                    if k == j {
                        part.to_vec()
                    } else {
                        quantize(part, enc)
                    }
                })
                .collect();
            let refs: Vec<&[f32]> = q.iter().map(Vec::as_slice).collect();
            want.extend(quantize(&mean(&refs), enc));
        }
        let refs: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
        let exact = mean(&refs);
        for e in &evs {
            assert!(rejections(e).is_empty(), "{enc}: {e:?}");
            let done = finished(e);
            assert_eq!(done.len(), 1, "{enc}");
            let o = &done[0];
            assert!(o.parts.iter().all(|p| p.averaged), "{enc}");
            // The whole group ends with the same values, bit for bit.
            assert_eq!(bits(&o.values), bits(&want), "{enc}");
        }
        // (tests/sim.rs checks the distance to the exact mean against each codec's bound.)
        assert_ne!(
            bits(&want),
            bits(&exact),
            "{enc} should not be exact on these values"
        );
    }
}

#[test]
fn f32_compression_keeps_the_exact_mean() {
    let vals = [
        vec![0.1f32, 1e-7, 3.0],
        vec![0.2, 2e-7, -3.0],
        vec![0.7, 5.0, 1e9],
    ];
    let (_, evs) = run_three(Encoding::F32, &vals);
    let refs: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
    for e in &evs {
        assert_eq!(bits(&finished(e)[0].values), bits(&mean(&refs)));
    }
}

#[test]
fn top_k_compression_is_sent_as_f32() {
    let vals = [
        vec![1.0f32, 2.0, 3.0],
        vec![4.0, 5.0, 6.0],
        vec![7.0, 8.0, 9.0],
    ];
    let (_, evs) = run_three(Encoding::TopK { k: 1 }, &vals);
    let refs: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
    for e in &evs {
        assert!(rejections(e).is_empty());
        assert_eq!(bits(&finished(e)[0].values), bits(&mean(&refs)));
    }
    let (mut a, formed) = {
        let mut a = averager(
            id(A),
            AveragingConfig {
                compression: Encoding::TopK { k: 1 },
                ..cfg()
            },
        );
        a.set_peers(&[id(B)]);
        a.start_round(ms(0), 1, vec![1.0, 2.0]).expect("start");
        a.handle_message(ms(1), id(B), join(id(B), 1, 2));
        let t = transmits(&mut a);
        (a, t)
    };
    let _ = events(&mut a);
    let part = formed
        .iter()
        .find_map(|t| match &t.msg {
            AvgMessage::Part { payload, .. } => Some(payload.clone()),
            _ => None,
        })
        .expect("a Part");
    assert_eq!(part.encoding, Encoding::F32);
}

/// Runs one round of three sparse-mode averagers (dense fallback f32) over `vals` and returns
/// each node's events and the encodings of every `Part` and `Reduced` sent.
fn run_three_sparse(vals: &[Vec<f32>]) -> (Vec<Vec<AvgEvent>>, Vec<Encoding>) {
    let mut nodes: Vec<Averager> = [A, B, C]
        .iter()
        .map(|&m| {
            let config = AveragingConfig {
                sparse: true,
                ..cfg()
            };
            let mut a = averager(id(m), config);
            a.set_peers(&[id(A), id(B), id(C)]);
            a
        })
        .collect();
    for (n, v) in nodes.iter_mut().zip(vals) {
        n.start_round(ms(0), 1, v.clone()).expect("start");
    }
    let sent = std::cell::RefCell::new(Vec::new());
    let evs = pump_losing(&mut nodes, ms(1), |_, t| {
        if let AvgMessage::Part { payload, .. } | AvgMessage::Reduced { payload, .. } = &t.msg {
            sent.borrow_mut().push(payload.encoding);
        }
        false
    });
    (evs, sent.into_inner())
}

#[test]
fn sparse_values_travel_as_exact_entries_and_average_exactly() {
    let sparse_vec = |at: &[(usize, f32)]| {
        let mut v = vec![0f32; 300];
        for &(i, x) in at {
            v[i] = x;
        }
        v
    };
    let vals = [
        sparse_vec(&[(3, 1.5), (150, -2.0), (299, 1e-7)]),
        sparse_vec(&[(3, 0.25), (101, 7.0)]),
        sparse_vec(&[(0, -1.0), (250, 3.0), (251, 3.5), (299, 1e-7)]),
    ];
    let refs: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
    let (evs, sent) = run_three_sparse(&vals);
    // 2 parts sent by each of 3 members, then 2 reduced parts sent by each: all sparse.
    assert_eq!(sent.len(), 12, "{sent:?}");
    assert!(
        sent.iter().all(|e| matches!(e, Encoding::TopK { .. })),
        "{sent:?}"
    );
    for e in &evs {
        assert!(rejections(e).is_empty(), "{:?}", rejections(e));
        assert_eq!(bits(&finished(e)[0].values), bits(&mean(&refs)));
    }

    // A member whose values are dense sends dense parts; a mean that is no longer sparse
    // travels dense; the result is still the exact mean.
    let mut vals = vals;
    vals[2] = (0..300).map(|i| i as f32 - 150.0).collect();
    let refs: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
    let (evs, sent) = run_three_sparse(&vals);
    assert_eq!(sent.len(), 12, "{sent:?}");
    let dense = sent.iter().filter(|e| **e == Encoding::F32).count();
    assert_eq!(dense, 2 + 6, "C's parts and every reduced part: {sent:?}");
    for e in &evs {
        assert!(rejections(e).is_empty(), "{:?}", rejections(e));
        assert_eq!(bits(&finished(e)[0].values), bits(&mean(&refs)));
    }
}

#[test]
fn reducer_accepts_other_dense_encodings_and_rejects_top_k() {
    let own = vec![1.0f32; 9];
    let (mut a, _) = leader_with_group(own.clone());
    let part = |payload: Payload| AvgMessage::Part {
        round: 1,
        part: 0,
        payload,
    };
    // Top-k, including one declaring four billion values in 0 bytes: refused before decoding.
    let sparse = [
        Payload::encode(&[1.0, 2.0, 3.0], Encoding::TopK { k: 3 }),
        Payload {
            len: u32::MAX,
            encoding: Encoding::TopK { k: 0 },
            bytes: Bytes::from(vec![]),
            digest: *blake3::hash(&[]).as_bytes(),
        },
    ];
    for p in sparse {
        a.handle_message(ms(10), id(B), part(p));
        let r = rejections(&events(&mut a));
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("dense"), "{r:?}");
    }
    // A corrupt int8 body (NaN scale) names the problem.
    let mut bad = Payload::encode(&[1.0, 2.0, 3.0], Encoding::Int8 { block: 4 });
    bad.bytes.make_mut()[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    bad.digest = *blake3::hash(&bad.bytes).as_bytes();
    a.handle_message(ms(10), id(B), part(bad));
    let r = rejections(&events(&mut a));
    assert!(r.len() == 1 && r[0].contains("scale"), "{r:?}");
    // B sends f16, C int8: both accepted; the mean is over what they decode to.
    let b_vals = [10.1f32, 20.2, 30.3];
    let c_vals = [0.5f32, -0.25, 7.77];
    let b_p = Payload::encode(&b_vals, Encoding::F16);
    let c_p = Payload::encode(&c_vals, Encoding::Int8 { block: 2 });
    let (b_dec, c_dec) = (b_p.decode().expect("f16"), c_p.decode().expect("int8"));
    a.handle_message(ms(11), id(B), part(b_p));
    a.handle_message(ms(12), id(C), part(c_p));
    assert!(rejections(&events(&mut a)).is_empty());
    let want = mean(&[&own[0..3], &b_dec, &c_dec]);
    let sent = transmits(&mut a);
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[0].msg,
        AvgMessage::Reduced {
            round: 1,
            part: 0,
            contributors: vec![id(A), id(B), id(C)],
            payload: Payload::from_f32(&want),
        }
    );
}

/// Gossip and direct streams are not ordered: a `Part` can reach a member
/// before the leader's `Group` does. It must be kept and used once the group
/// forms, so the round completes without waiting for a retransmit.
#[test]
fn parts_that_overtake_the_group_message_are_kept() {
    let vals = [
        vec![1.0f32, 2.0, 3.0],
        vec![4.0, 5.0, 6.0],
        vec![7.0, 8.0, 9.0],
    ];
    let mut nodes: Vec<Averager> = [A, B, C].iter().map(|&m| node(m, &[A, B, C])).collect();
    let mut queue: Vec<(usize, Transmit)> = Vec::new();
    for (i, (n, v)) in nodes.iter_mut().zip(&vals).enumerate() {
        n.start_round(ms(0), 1, v.clone()).expect("start");
        queue.extend(transmits(n).into_iter().map(|t| (i, t)));
    }
    // Delivers the queued transmits matching `pick` to their addressees.
    let deliver = |nodes: &mut Vec<Averager>,
                   queue: &mut Vec<(usize, Transmit)>,
                   pick: &dyn Fn(usize, &Transmit, usize) -> bool| {
        let mut rest = Vec::new();
        let mut produced = Vec::new();
        for (from, t) in queue.drain(..) {
            let sender = nodes[from].me();
            let mut kept = false;
            for (to, node) in nodes.iter_mut().enumerate() {
                let addressed = match t.to {
                    Destination::Broadcast => to != from,
                    Destination::Peer(p) => p == node.me(),
                };
                if !addressed {
                    continue;
                }
                if pick(from, &t, to) {
                    node.handle_message(ms(1), sender, t.msg.clone());
                    produced.extend(transmits(node).into_iter().map(|x| (to, x)));
                } else {
                    kept = true;
                }
            }
            if kept {
                rest.push((from, t));
            }
        }
        queue.extend(rest);
        queue.extend(produced);
    };
    // Joins reach the leader A only; A forms the group.
    deliver(&mut nodes, &mut queue, &|_, t, to| {
        matches!(t.msg, AvgMessage::Join { .. }) && to == 0
    });
    // The Group reaches B, but not yet C.
    deliver(&mut nodes, &mut queue, &|_, t, to| {
        matches!(t.msg, AvgMessage::Group { .. }) && to == 1
    });
    // A's and B's Parts reach C while C is still matchmaking.
    deliver(&mut nodes, &mut queue, &|_, t, to| {
        matches!(t.msg, AvgMessage::Part { .. }) && to == 2
    });
    // Now the Group reaches C, and everything else flows, all at the same instant.
    deliver(&mut nodes, &mut queue, &|_, t, to| {
        matches!(t.msg, AvgMessage::Group { .. }) && to == 2
    });
    let mut evs: Vec<Vec<AvgEvent>> = nodes.iter_mut().map(events).collect();
    for _ in 0..10 {
        deliver(&mut nodes, &mut queue, &|_, t, _| {
            !matches!(t.msg, AvgMessage::Join { .. })
        });
        for (e, n) in evs.iter_mut().zip(nodes.iter_mut()) {
            e.extend(events(n));
        }
    }
    let refs: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
    let want = mean(&refs);
    for e in &evs {
        let done = finished(e);
        assert_eq!(
            done.len(),
            1,
            "a member did not finish without a retransmit: {e:?}"
        );
        assert_eq!(bits(&done[0].values), bits(&want));
        assert!(done[0]
            .parts
            .iter()
            .all(|p| p.averaged && p.contributors.len() == 3));
    }
}

/// A member whose tensors arrive invalid (the transport refuses them before the averager sees
/// them) is excluded when the transport says so: the others finish at once, without it,
/// instead of waiting for the reduce deadline.
#[test]
fn an_excluded_member_is_not_waited_for() {
    let vals = [
        vec![1.0f32, 2.0, 3.0],
        vec![3.0, 4.0, 5.0],
        vec![9.0, 9.0, 9.0],
    ];
    let mut nodes = trio_in_round(3, &vals);
    // Deliver everything except C's tensors (as if each failed validation on arrival).
    let evs = pump_losing(&mut nodes, ms(1), |from, t| {
        from == 2 && matches!(t.msg, AvgMessage::Part { .. } | AvgMessage::Reduced { .. })
    });
    assert!(
        finished(&evs[0]).is_empty(),
        "A finished while still waiting for C"
    );
    for n in &mut nodes[..2] {
        n.exclude_member(ms(2), id(C));
    }
    // A and B's reduced parts cross once more now that they stopped waiting.
    let more = pump(&mut nodes[..2], ms(3));
    let want = mean(&[&vals[0], &vals[1]]);
    for (i, e) in more.iter().enumerate() {
        let mut all = evs[i].clone();
        all.extend(e.iter().cloned());
        let done = finished(&all);
        assert_eq!(done.len(), 1, "node {i}: {all:?}");
        let o = &done[0];
        assert_eq!(o.dropped, vec![id(C)]);
        // Parts reduced by A and B hold the mean of A and B; C's part stays local.
        for p in &o.parts {
            if p.averaged {
                assert_eq!(
                    bits(&o.values[p.range.clone()]),
                    bits(&want[p.range.clone()])
                );
                assert_eq!(p.contributors, vec![id(A), id(B)]);
            } else {
                assert_eq!(o.values[p.range.clone()], vals[i][p.range.clone()]);
            }
        }
    }
}

#[test]
fn a_member_excluded_for_what_it_sent_counts_for_nothing_it_sends_later() {
    const D: u8 = 4;
    let ids = [A, B, C, D];
    let vals = [
        vec![1.0f32, 2.0, 3.0, 4.0],
        vec![3.0, 4.0, 5.0, 6.0],
        vec![90.0, 90.0, 90.0, 90.0],
        vec![5.0, 6.0, 7.0, 8.0],
    ];
    let mut nodes: Vec<Averager> = ids.iter().map(|&m| node(m, &ids)).collect();
    for (n, v) in nodes.iter_mut().zip(&vals) {
        n.start_round(ms(0), 3, v.clone()).expect("start");
    }
    // C's and D's parts are still on their way when A and B exclude C (as
    // if something else C sent had failed validation).
    let (_, held) = pump_holding(&mut nodes, ms(1), |from, t| {
        from >= 2 && matches!(t.msg, AvgMessage::Part { .. })
    });
    assert!(!held.is_empty());
    for n in &mut nodes[..2] {
        n.exclude_member(ms(2), id(C));
    }
    let mut evs = pump(&mut nodes, ms(2));
    deliver(&mut nodes, ms(3), held);
    for (e, more) in evs.iter_mut().zip(pump(&mut nodes, ms(3))) {
        e.extend(more);
    }
    let want = mean(&[&vals[0], &vals[1], &vals[3]]);
    for (i, e) in evs.iter().enumerate().take(2) {
        let done = finished(e);
        assert_eq!(done.len(), 1, "node {i}: {e:?}");
        let o = &done[0];
        // C's later parts did not enter the means A and B reduce, and the
        // part C reduced stays local. (D never excluded C, so C is in D's.)
        for (j, p) in o.parts.iter().enumerate() {
            match ids[j % ids.len()] {
                A | B => {
                    assert_eq!(p.contributors, vec![id(A), id(B), id(D)], "node {i}");
                    assert_eq!(
                        bits(&o.values[p.range.clone()]),
                        bits(&want[p.range.clone()])
                    );
                }
                C => {
                    assert!(!p.averaged, "node {i}: {p:?}");
                    assert_eq!(o.values[p.range.clone()], vals[i][p.range.clone()]);
                }
                _ => assert_eq!(p.contributors.len(), 4, "node {i}: {p:?}"),
            }
        }
    }
}

#[test]
fn the_reduce_deadline_fits_measured_rounds_when_adaptive() {
    let config = AveragingConfig {
        reduce_timeout: Duration::from_secs(30),
        adaptive_deadline: true,
        ..cfg()
    };
    let mut nodes = swarm(&[A, B, C], &config);
    let mut now = ms(0);
    // Three complete rounds, each taking some hundreds of ms of virtual time.
    for round in 1..=super::deadline::MIN_SAMPLES as u64 {
        assert_eq!(nodes[0].reduce_deadline(), Duration::from_secs(30));
        for n in nodes.iter_mut() {
            n.start_round(now, round, vec![round as f32; 6]).unwrap();
        }
        // Joins and the group travel at once; the first parts are lost.
        pump_losing(&mut nodes, now, |_, t| {
            matches!(t.msg, AvgMessage::Part { .. } | AvgMessage::Reduced { .. })
        });
        for n in nodes.iter_mut() {
            n.handle_timeout(now + ms(300));
        }
        now += ms(300);
        // Their retransmits complete the round.
        while nodes.iter().any(|n| n.in_flight().is_some()) {
            let evs = pump(&mut nodes, now);
            for (i, e) in evs.iter().enumerate() {
                for o in finished(e) {
                    assert!(o.dropped.is_empty(), "node {i}: {o:?}");
                }
            }
            if nodes.iter().any(|n| n.in_flight().is_some()) {
                now = fire_next_timeout(&mut nodes);
            }
        }
        now += ms(1_000);
    }
    // 4 x the slowest round is under the floor: the deadline is the floor now.
    assert_eq!(nodes[0].reduce_deadline(), super::deadline::FLOOR);
    // C stalls after the group forms: the others drop it at the fitted deadline.
    let round = super::deadline::MIN_SAMPLES as u64 + 1;
    for n in nodes.iter_mut() {
        n.start_round(now, round, vec![1.0; 6]).unwrap();
    }
    let formed = now;
    pump_losing(&mut nodes, now, |i, t| {
        i == 2 && matches!(t.msg, AvgMessage::Part { .. } | AvgMessage::Reduced { .. })
    });
    let survivors = &mut nodes[..2];
    let mut done = Vec::new();
    while done.len() < 2 {
        now = fire_next_timeout(survivors);
        let evs = pump(survivors, now);
        done.extend(evs.iter().flat_map(|e| finished(e)));
    }
    assert_eq!(
        now - formed,
        super::deadline::FLOOR,
        "not the configured 30 s"
    );
    assert!(done.iter().all(|o| o.dropped == vec![id(C)]), "{done:?}");
}

/// Four peers A..D whose rounds start 50 ms apart (A first): `rounds` healthy
/// rounds from `now`, each delivered at once. Returns the time after them.
fn staggered_rounds(nodes: &mut [Averager], rounds: std::ops::RangeInclusive<u64>) -> Duration {
    let mut now = ms(0);
    for round in rounds {
        for i in 0..nodes.len() {
            let t = now + ms(50 * i as u64);
            nodes[i].start_round(t, round, vec![i as f32; 8]).unwrap();
            let evs = pump(nodes, t);
            assert!(evs
                .iter()
                .all(|e| finished(e).iter().all(|o| o.dropped.is_empty())));
        }
        assert!(
            nodes.iter().all(|n| n.in_flight().is_none()),
            "round {round}"
        );
        now += ms(1_000);
    }
    now
}

/// Fires timers on `nodes` until node `watch` has finished its round, losing
/// every `Group` if `lose_groups`; returns when.
fn run_until_finished(
    nodes: &mut [Averager],
    watch: usize,
    lose_groups: bool,
) -> (Duration, RoundOutcome) {
    loop {
        let now = fire_next_timeout(nodes);
        let evs = pump_losing(nodes, now, |_, t| {
            lose_groups && matches!(t.msg, AvgMessage::Group { .. })
        });
        if let Some(o) = finished(&evs[watch]).pop() {
            return (now, o);
        }
    }
}

#[test]
fn the_join_window_and_the_group_wait_fit_measured_rounds_when_adaptive() {
    use super::deadline::{GROUP_MARGIN, JOIN_FLOOR, MIN_SAMPLES};
    for adaptive in [true, false] {
        let config = AveragingConfig {
            join_window: Duration::from_secs(20),
            group_timeout: Duration::from_secs(40),
            adaptive_deadline: adaptive,
            ..cfg()
        };
        let mut nodes = swarm(&[A, B, C, D], &config);
        let mut now = staggered_rounds(&mut nodes, 1..=MIN_SAMPLES as u64);
        let (window, wait) = if adaptive {
            // Everyone joined within 150 ms and the Group came within 100 ms:
            // 4x that is under the floors.
            (JOIN_FLOOR, JOIN_FLOOR + GROUP_MARGIN)
        } else {
            (Duration::from_secs(20), Duration::from_secs(60))
        };
        assert_eq!(nodes[0].join_window(), window, "adaptive: {adaptive}");
        assert_eq!(nodes[1].group_wait(), wait, "adaptive: {adaptive}");

        // D has crashed but is still in everyone's view: the leader A closes
        // the group without it at its (fitted) window.
        let round = MIN_SAMPLES as u64 + 1;
        for (i, n) in nodes[..3].iter_mut().enumerate() {
            n.start_round(now + ms(50 * i as u64), round, vec![1.0; 8])
                .unwrap();
        }
        pump(&mut nodes[..3], now + ms(100));
        let (done, o) = run_until_finished(&mut nodes[..3], 0, false);
        assert_eq!(done - now, window, "adaptive: {adaptive}");
        assert_eq!(o.group, vec![id(A), id(B), id(C)]);
        now = done + ms(1_000);

        // A's Group is lost (it dies right after closing): B, which counts A
        // as its leader, waits its group wait and finishes alone. That wait
        // now covers B's last one: A's Group came a window less 50 ms after
        // B's start.
        let wait = if adaptive {
            (4 * (window - ms(50))).max(JOIN_FLOOR + GROUP_MARGIN)
        } else {
            wait
        };
        assert_eq!(nodes[1].group_wait(), wait, "adaptive: {adaptive}");
        let round = round + 1;
        for (i, n) in nodes[..3].iter_mut().enumerate() {
            n.start_round(now + ms(50 * i as u64), round, vec![1.0; 8])
                .unwrap();
        }
        pump_losing(&mut nodes[..3], now + ms(100), |_, t| {
            matches!(t.msg, AvgMessage::Group { .. })
        });
        let (done, o) = run_until_finished(&mut nodes[..3], 1, true);
        assert_eq!(done - (now + ms(50)), wait, "adaptive: {adaptive}");
        assert_eq!(o.group, vec![id(B)], "alone");
    }
}

/// Rounds 1..=`rounds` of A, B and C in which the member at index `staller`
/// joins (and, if it is the smallest id, leads) but never sends a tensor.
/// Returns the swarm and, per round, what honest member `watch` finished
/// with: (round, group, dropped, time it took).
#[allow(clippy::type_complexity)]
fn rounds_with_a_staller(
    staller: usize,
    watch: usize,
    rounds: u64,
) -> (
    Vec<Averager>,
    Vec<(u64, Vec<NodeId>, Vec<NodeId>, Duration)>,
) {
    let mut nodes = swarm(&[A, B, C], &cfg());
    let mute = |i: usize, t: &Transmit| {
        i == staller && matches!(t.msg, AvgMessage::Part { .. } | AvgMessage::Reduced { .. })
    };
    let mut now = ms(0);
    let mut took = Vec::new();
    for round in 1..=rounds {
        for n in nodes.iter_mut() {
            n.start_round(now, round, vec![round as f32; 6]).unwrap();
        }
        let mut evs = pump_losing(&mut nodes, now, mute);
        let mut t = now;
        while finished(&evs[watch]).is_empty() {
            t = fire_next_timeout(&mut nodes);
            evs = pump_losing(&mut nodes, t, mute);
        }
        let o = finished(&evs[watch]).pop().unwrap();
        took.push((round, o.group.clone(), o.dropped.clone(), t - now));
        // Let every round end (the staller waits for parts nobody sends it).
        while nodes.iter().any(|n| n.in_flight().is_some()) {
            t = fire_next_timeout(&mut nodes);
            pump_losing(&mut nodes, t, mute);
        }
        now = t + ms(1_000);
    }
    (nodes, took)
}

#[test]
fn a_member_that_stalls_every_round_sits_out_ever_longer() {
    let (nodes, took) = rounds_with_a_staller(2, 0, 5);
    let deadline = cfg().reduce_timeout;
    let abc = vec![id(A), id(B), id(C)];
    let ab = vec![id(A), id(B)];
    assert_eq!(
        took,
        vec![
            (1, abc.clone(), vec![id(C)], deadline),
            (2, abc.clone(), vec![id(C)], deadline),
            (3, ab.clone(), vec![], ms(0)),
            (4, ab, vec![], ms(0)),
            (5, abc, vec![id(C)], deadline),
        ],
        "two strikes, two rounds out, back, out again"
    );
    for n in &nodes[..2] {
        assert_eq!(n.sitting_out(6), vec![id(C)], "4 rounds this time");
        assert_eq!(n.sitting_out(9), vec![id(C)]);
        assert!(n.sitting_out(10).is_empty());
    }
}

#[test]
fn a_stalling_leader_sits_out_and_its_group_is_refused() {
    // A is the smallest id: while it takes part it leads every round.
    let (nodes, took) = rounds_with_a_staller(0, 1, 4);
    let deadline = cfg().reduce_timeout;
    let abc = vec![id(A), id(B), id(C)];
    let bc = vec![id(B), id(C)];
    assert_eq!(
        took,
        vec![
            (1, abc.clone(), vec![id(A)], deadline),
            (2, abc, vec![id(A)], deadline),
            (3, bc.clone(), vec![], ms(0)),
            (4, bc, vec![], ms(0)),
        ],
        "B and C average as a pair at once, though A sends them its Group"
    );
    let refused = |n: &Averager| n.sitting_out(4) == vec![id(A)];
    assert!(refused(&nodes[1]) && refused(&nodes[2]));
}

#[test]
fn only_members_that_made_the_round_wait_earn_strikes() {
    // C's tensors never arrive. B excludes C at once (as if it had sent
    // invalid data), A waits for C until the deadline: after two such
    // rounds A sits C out, B does not.
    let mut nodes = swarm(&[A, B, C], &cfg());
    let silent_c = |i: usize, t: &Transmit| {
        i == 2 && matches!(t.msg, AvgMessage::Part { .. } | AvgMessage::Reduced { .. })
    };
    let mut now = ms(0);
    for round in 1..=2u64 {
        for n in nodes.iter_mut() {
            n.start_round(now, round, vec![1.0; 6]).unwrap();
        }
        pump_losing(&mut nodes, now, silent_c);
        nodes[1].exclude_member(now, id(C));
        while nodes.iter().any(|n| n.in_flight().is_some()) {
            now = fire_next_timeout(&mut nodes);
            pump_losing(&mut nodes, now, silent_c);
        }
        now += ms(1_000);
    }
    assert_eq!(nodes[0].sitting_out(3), vec![id(C)]);
    assert!(
        nodes[1].sitting_out(3).is_empty(),
        "an exclusion costs no wait"
    );
}

#[test]
fn a_member_replaying_its_old_messages_changes_nothing() {
    // C records everything it sends in round 1 and replays it all to A and
    // B during round 2, before and after its honest round-2 messages.
    let mut nodes = swarm(&[A, B, C], &cfg());
    let sent = std::cell::RefCell::new(Vec::new());
    for n in nodes.iter_mut() {
        n.start_round(ms(0), 1, vec![1.0; 6]).unwrap();
    }
    pump_losing(&mut nodes, ms(0), |i, t| {
        if i == 2 {
            sent.borrow_mut().push(t.msg.clone());
        }
        false
    });
    assert!(nodes.iter().all(|n| n.last_finished() == Some(1)));
    let old = sent.into_inner();
    assert!(old.iter().any(|m| matches!(m, AvgMessage::Part { .. })));
    let vals: Vec<Vec<f32>> = (0..3).map(|i| vec![2.0 + i as f32; 6]).collect();
    let replay = |nodes: &mut [Averager], now| {
        for n in nodes[..2].iter_mut() {
            for m in &old {
                n.handle_message(now, id(C), m.clone());
            }
        }
    };
    for (n, v) in nodes.iter_mut().zip(&vals) {
        n.start_round(ms(10), 2, v.clone()).unwrap();
    }
    replay(&mut nodes, ms(10));
    let mut evs = pump(&mut nodes, ms(11));
    replay(&mut nodes, ms(12));
    for (e, n) in evs.iter_mut().zip(nodes.iter_mut()) {
        e.extend(events(n));
    }
    let want = mean(&[&vals[0], &vals[1], &vals[2]]);
    for (i, e) in evs.iter().enumerate() {
        let done = finished(e);
        assert_eq!(done.len(), 1, "node {i}: {e:?}");
        assert_eq!(done[0].round, 2);
        assert!(done[0].dropped.is_empty());
        assert_eq!(bits(&done[0].values), bits(&want), "node {i}");
    }
}

/// Two members with `part_values` 2 over 8 values: 4 parts, A reduces 0 and 2, B 1 and 3.
fn pair_with_small_parts(vals: &[Vec<f32>; 2]) -> Vec<Averager> {
    let config = AveragingConfig {
        part_values: 2,
        ..cfg()
    };
    let mut nodes = swarm(&[A, B], &config);
    assert_eq!(config.part_count(8, 2), 4);
    for (n, v) in nodes.iter_mut().zip(vals) {
        n.start_round(ms(0), 1, v.clone()).expect("start");
    }
    nodes
}

#[test]
fn a_reducer_returns_each_part_as_soon_as_its_contributions_are_in() {
    let vals = [
        (0..8).map(|i| i as f32).collect::<Vec<f32>>(),
        (0..8).map(|i| 10.0 + i as f32 * 0.5).collect(),
    ];
    let mut nodes = pair_with_small_parts(&vals);
    // Form the group, losing A's Parts (B's arrive; A reduces parts 0 and 2 at once).
    let evs = pump_losing(&mut nodes, ms(1), |i, t| {
        i == 0 && matches!(t.msg, AvgMessage::Part { .. })
    });
    assert!(evs.iter().all(|e| rejections(e).is_empty()), "{evs:?}");
    assert_eq!(
        nodes[0].in_flight(),
        Some(1),
        "A still waits for parts 1 and 3"
    );
    // A re-sends its Parts in part order, each to that part's reducer.
    let now = ms(501);
    nodes[0].handle_timeout(now);
    let parts: Vec<(Destination, u32, Payload)> = transmits(&mut nodes[0])
        .into_iter()
        .filter_map(|t| match t.msg {
            AvgMessage::Part { part, payload, .. } => Some((t.to, part, payload)),
            _ => None,
        })
        .collect();
    assert_eq!(
        parts
            .iter()
            .map(|(to, p, _)| (to.clone(), *p))
            .collect::<Vec<_>>(),
        vec![(Destination::Peer(id(B)), 1), (Destination::Peer(id(B)), 3)]
    );
    // Part 1 alone: B sends Reduced{1} before part 3 has arrived.
    let (_, _, first) = &parts[0];
    nodes[1].handle_message(now, id(A), part_msg(1, first.clone()));
    let sent = transmits(&mut nodes[1]);
    let reduced: Vec<u32> = sent
        .iter()
        .filter_map(|t| match t.msg {
            AvgMessage::Reduced { part, .. } => Some(part),
            _ => None,
        })
        .collect();
    assert_eq!(reduced, vec![1]);
    for t in sent {
        nodes[0].handle_message(now, id(B), t.msg);
    }
    let (_, _, second) = &parts[1];
    nodes[1].handle_message(now, id(A), part_msg(3, second.clone()));
    let evs = pump(&mut nodes, now);
    let want = mean(&[&vals[0], &vals[1]]);
    for e in &evs {
        assert!(rejections(e).is_empty(), "{e:?}");
        let done = finished(e);
        assert_eq!(done.len(), 1);
        let o = &done[0];
        assert_eq!(bits(&o.values), bits(&want));
        assert_eq!(
            o.parts.iter().map(|p| p.range.clone()).collect::<Vec<_>>(),
            split_ranges(8, 4)
        );
        assert!(o
            .parts
            .iter()
            .all(|p| p.averaged && p.contributors == o.group));
    }
}

fn part_msg(part: u32, payload: Payload) -> AvgMessage {
    AvgMessage::Part {
        round: 1,
        part,
        payload,
    }
}

#[test]
fn a_silent_member_leaves_every_part_it_reduces_local() {
    let vals = [
        (0..8).map(|i| i as f32).collect::<Vec<f32>>(),
        (0..8).map(|i| -(i as f32)).collect(),
    ];
    let mut nodes = pair_with_small_parts(&vals);
    // B forms the group with A, then nothing it sends after the Join arrives.
    let evs = pump_losing(&mut nodes, ms(1), |i, t| {
        i == 1 && !matches!(t.msg, AvgMessage::Join { .. })
    });
    assert!(rejections(&evs[0]).is_empty());
    while nodes[0].in_flight().is_some() {
        let now = nodes[0].poll_timeout().expect("timer");
        nodes[0].handle_timeout(now);
        transmits(&mut nodes[0]);
    }
    let done = finished(&events(&mut nodes[0]));
    let o = &done[0];
    assert_eq!(o.dropped, vec![id(B)]);
    // A's own parts hold A's values (B never contributed): the mean over A alone.
    assert_eq!(
        o.parts.iter().map(|p| p.averaged).collect::<Vec<_>>(),
        vec![true, false, true, false]
    );
    assert_eq!(bits(&o.values), bits(&vals[0]));
    assert!(o.parts.iter().all(|p| p.contributors == vec![id(A)]));
}

#[test]
fn members_cutting_parts_differently_are_refused_with_a_reason() {
    let mut a = averager(
        id(A),
        AveragingConfig {
            part_values: 2,
            ..cfg()
        },
    );
    a.set_peers(&[id(A), id(B)]);
    a.start_round(ms(0), 1, vec![1.0; 8]).expect("start");
    a.handle_message(ms(1), id(B), join(id(B), 1, 8));
    transmits(&mut a);
    events(&mut a);
    // B cuts 8 values in 2 parts (one per member): its part 0 has 4 values, ours 2.
    a.handle_message(ms(2), id(B), part_msg(0, Payload::from_f32(&[2.0; 4])));
    // And a part index past our 4 parts.
    a.handle_message(ms(3), id(B), part_msg(4, Payload::from_f32(&[2.0; 2])));
    let why = rejections(&events(&mut a));
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(why[0].contains("has 4 values, the part has 2"), "{why:?}");
    assert!(why[1].contains("the round has 4 parts"), "{why:?}");
}

#[test]
fn parts_are_encoded_when_taken_and_not_sent_once_moot() {
    let kinds = |t: &[Transmit]| -> Vec<String> {
        t.iter()
            .map(|t| match &t.msg {
                AvgMessage::Join { .. } => "join".to_string(),
                AvgMessage::Group { .. } => "group".to_string(),
                AvgMessage::Part { part, .. } => format!("part {part}"),
                AvgMessage::Reduced { part, .. } => format!("reduced {part}"),
            })
            .collect()
    };
    // The leader's Group leaves before its parts, which follow in part order.
    let (_, t) = leader_with_group((0..9).map(|i| i as f32).collect());
    assert_eq!(kinds(&t), ["join", "group", "part 1", "part 2"]);

    // A driver that takes nothing until the round has ended sends no part of it.
    let config = AveragingConfig {
        part_values: 2,
        ..cfg()
    };
    let mut a = swarm(&[A, B], &config).remove(0);
    a.start_round(ms(0), 1, vec![1.0; 8]).expect("start");
    a.handle_message(ms(1), id(B), join(id(B), 1, 8));
    assert_eq!(a.in_flight(), Some(1));
    while a.in_flight().is_some() {
        let now = a.poll_timeout().expect("timer");
        a.handle_timeout(now);
    }
    assert_eq!(
        kinds(&transmits(&mut a)),
        ["join", "group", "reduced 0", "reduced 2"],
        "queued parts of a finished round must not be encoded and sent"
    );
    assert_eq!(finished(&events(&mut a)).len(), 1);
}

/// B and C, who hold a `Join` of A for round 2 (A was ready for it before
/// them), then see A join round 3: A finished round 2 without them.
fn late_pair_behind_a() -> Vec<Averager> {
    let mut nodes: Vec<Averager> = [B, C].iter().map(|&m| node(m, &[A, B, C])).collect();
    for n in &mut nodes {
        n.handle_message(ms(0), id(A), join(id(A), 2, 3));
    }
    nodes
}

/// B's and C's values in [`late_pair_behind_a`]'s rounds.
fn pair_values() -> [Vec<f32>; 2] {
    [vec![1.0f32, 2.0, 3.0], vec![3.0, 4.0, 5.0]]
}

#[test]
fn a_peer_past_our_round_is_not_waited_for_in_matchmaking() {
    // A's later Join arrives before B and C start round 2: it replaces the
    // buffered one, and the pair closes at once without A.
    let mut nodes = late_pair_behind_a();
    let vals = pair_values();
    for n in &mut nodes {
        n.handle_message(ms(1), id(A), join(id(A), 3, 3));
    }
    for (n, v) in nodes.iter_mut().zip(&vals) {
        n.start_round(ms(2), 2, v.clone()).expect("start");
    }
    let evs = pump(&mut nodes, ms(2));
    let want = mean(&[&vals[0], &vals[1]]);
    for e in &evs {
        let done = finished(e);
        assert_eq!(done.len(), 1, "finished without waiting: {e:?}");
        assert_eq!(done[0].group, vec![id(B), id(C)]);
        assert_eq!(bits(&done[0].values), bits(&want));
    }

    // A's later Join arrives while B and C are matchmaking round 2 with A,
    // the smallest id, as their leader: they stop waiting for its Group.
    let mut nodes = late_pair_behind_a();
    for (n, v) in nodes.iter_mut().zip(&vals) {
        n.start_round(ms(2), 2, v.clone()).expect("start");
    }
    let evs = pump(&mut nodes, ms(2));
    assert!(evs.iter().all(|e| finished(e).is_empty()), "{evs:?}");
    for n in &mut nodes {
        n.handle_message(ms(3), id(A), join(id(A), 3, 3));
    }
    let evs = pump(&mut nodes, ms(3));
    for e in &evs {
        let done = finished(e);
        assert_eq!(done.len(), 1, "{e:?}");
        assert_eq!(done[0].group, vec![id(B), id(C)]);
        assert_eq!(bits(&done[0].values), bits(&want));
    }
}

/// B and C reduce `round` in a group that A (the smallest id, so the
/// leader) formed before finishing the round without them; then A's `Join`
/// for the next round arrives, the only other thing they hear from it. They
/// stop waiting for it one retry interval later at the latest (its `Reduced`
/// parts could still have been on the way).
fn round_that_a_moves_past(nodes: &mut [Averager], round: u64, vals: &[Vec<f32>; 2]) {
    round_that_a_moves_past_after(nodes, round, vals, &[]);
}

/// [`round_that_a_moves_past`], A sending `from_a` to B and C once the
/// group has formed.
fn round_that_a_moves_past_after(
    nodes: &mut [Averager],
    round: u64,
    vals: &[Vec<f32>; 2],
    from_a: &[AvgMessage],
) {
    let at = |ms_in: u64| Duration::from_secs(10 * round) + ms(ms_in);
    for (n, v) in nodes.iter_mut().zip(vals) {
        n.start_round(at(0), round, v.clone()).expect("start");
    }
    let grouped = group(round, 3, vec![id(A), id(B), id(C)]);
    for n in nodes.iter_mut() {
        n.handle_message(at(1), id(A), grouped.clone());
        for msg in from_a {
            n.handle_message(at(1), id(A), msg.clone());
        }
    }
    let evs = pump(nodes, at(1));
    assert!(
        evs.iter().all(|e| finished(e).is_empty()),
        "waiting for A's part: {evs:?}"
    );
    let next = join(id(A), round + 1, 3);
    for n in nodes.iter_mut() {
        n.handle_message(at(2), id(A), next.clone());
    }
    let mut evs = pump(nodes, at(2));
    assert!(evs.iter().all(|e| finished(e).is_empty()), "{evs:?}");
    // Timers fire (re-sends) until A's grace is over, not the reduce deadline.
    fire_until_all_finished(nodes, &mut evs, at(2) + cfg().retry_interval);
    let want = mean(&[&vals[0], &vals[1]]);
    for (i, e) in evs.iter().enumerate() {
        let done = finished(e);
        assert_eq!(done.len(), 1, "round {round}, node {i}: {e:?}");
        let o = &done[0];
        assert_eq!(o.dropped, vec![id(A)]);
        for p in &o.parts {
            if p.averaged {
                assert_eq!(p.contributors, vec![id(B), id(C)]);
                assert_eq!(
                    bits(&o.values[p.range.clone()]),
                    bits(&want[p.range.clone()])
                );
            } else {
                assert_eq!(o.values[p.range.clone()], vals[i][p.range.clone()]);
            }
        }
    }
}

#[test]
fn a_member_that_moved_on_without_a_word_is_not_waited_for() {
    let mut nodes = late_pair_behind_a();
    let vals = pair_values();
    round_that_a_moves_past(&mut nodes, 2, &vals);
    for n in &nodes {
        assert!(n.sitting_out(3).is_empty(), "one strike is not enough");
    }
    // It still stalled the round from their side: a peer that forms groups
    // and then moves on without sending anything sits out like any staller.
    round_that_a_moves_past(&mut nodes, 3, &vals);
    for n in &nodes {
        assert_eq!(n.sitting_out(4), vec![id(A)]);
    }
}

#[test]
fn a_member_whose_only_part_was_refused_is_still_one_that_sent_nothing() {
    let mut nodes = late_pair_behind_a();
    let vals = pair_values();
    // A part index the round does not have: refused, so it proves nothing.
    let bogus = AvgMessage::Part {
        round: 2,
        part: 99,
        payload: Payload::encode(&[1.0], Encoding::F32),
    };
    round_that_a_moves_past_after(&mut nodes, 2, &vals, &[bogus]);
}

#[test]
fn a_member_we_heard_from_keeps_its_place_when_its_join_overtakes_its_results() {
    let vals = [
        vec![1.0f32, 2.0, 3.0],
        vec![3.0, 4.0, 5.0],
        vec![9.0, 9.0, 9.0],
    ];
    let mut nodes = trio_in_round(1, &vals);
    // Everything arrives but A's Reduced messages, which are held back.
    let (evs, held) = pump_holding(&mut nodes, ms(1), |from, t| {
        from == 0 && matches!(t.msg, AvgMessage::Reduced { .. })
    });
    assert_eq!(finished(&evs[0]).len(), 1, "A has every result");
    // A's Join for round 2 overtakes its results: B and C keep waiting.
    for n in &mut nodes[1..] {
        n.handle_message(ms(2), id(A), join(id(A), 2, 3));
        assert!(finished(&events(n)).is_empty());
    }
    for (_, t) in held {
        for n in &mut nodes[1..] {
            if t.to == Destination::Peer(n.me()) {
                n.handle_message(ms(3), id(A), t.msg.clone());
            }
        }
    }
    let want = mean(&[&vals[0], &vals[1], &vals[2]]);
    for n in &mut nodes[1..] {
        let done = finished(&events(n));
        assert_eq!(done.len(), 1);
        assert!(done[0].dropped.is_empty());
        assert_eq!(bits(&done[0].values), bits(&want));
    }
}

/// A's `Part` to B is lost, so B's reducer deadline reduces B's part without
/// it; A still gets every result, finishes and joins round 2, and that
/// `Join` overtakes A's `Reduced` to B. B must still take A's result (within
/// A's grace) and end like C, not keep A's part local.
#[test]
fn a_join_overtaking_a_reduced_after_our_reducer_deadline_costs_no_divergence() {
    let vals = [
        vec![1.0f32, 2.0, 3.0],
        vec![3.0, 4.0, 5.0],
        vec![9.0, 9.0, 9.0],
    ];
    let mut nodes = trio_in_round(1, &vals);
    let to_b = |from: usize, t: &Transmit| from == 0 && t.to == Destination::Peer(id(B));
    let (mut evs, mut held) = pump_holding(&mut nodes, ms(1), to_b);
    let mut now = ms(1);
    while finished(&evs[0]).is_empty() {
        now = fire_next_timeout(&mut nodes);
        let (more, more_held) = pump_holding(&mut nodes, now, to_b);
        for (e, m) in evs.iter_mut().zip(more) {
            e.extend(m);
        }
        held.extend(more_held);
    }
    let a_done = finished(&evs[0]).remove(0);
    nodes[1].handle_message(now, id(A), join(id(A), 2, 3));
    // B's timers run on while A's Reduced is still on the way.
    nodes[1].handle_timeout(now + ms(100));
    for (_, t) in held {
        if matches!(t.msg, AvgMessage::Reduced { .. }) {
            nodes[1].handle_message(now + ms(100), id(A), t.msg);
        }
    }
    let mut bc = evs[1..].to_vec();
    bc[0].extend(events(&mut nodes[1]));
    fire_until_all_finished(&mut nodes[1..], &mut bc, Duration::MAX);
    let (b, c) = (finished(&bc[0]).remove(0), finished(&bc[1]).remove(0));
    assert_eq!(bits(&b.values), bits(&c.values), "B {b:?}\nC {c:?}");
    assert_eq!(bits(&b.values), bits(&a_done.values));
}

/// B hears A join round 3 while B is still matchmaking round 2, then A's
/// (late, re-sent) `Group` for round 2 lists A: B follows it, but does not
/// wait for A, which will not say again that it moved on.
#[test]
fn a_group_listing_a_peer_already_past_the_round_does_not_wait_for_it() {
    let mut nodes = late_pair_behind_a();
    let vals = pair_values();
    nodes[0].handle_message(ms(1), id(A), join(id(A), 3, 3));
    for (n, v) in nodes.iter_mut().zip(&vals) {
        n.start_round(ms(2), 2, v.clone()).expect("start");
    }
    let group = group(2, 3, vec![id(A), id(B), id(C)]);
    for n in nodes.iter_mut() {
        n.handle_message(ms(3), id(A), group.clone());
    }
    // C hears A's next Join only now, while reducing.
    nodes[1].handle_message(ms(3), id(A), join(id(A), 3, 3));
    let mut evs = pump(&mut nodes, ms(3));
    fire_until_all_finished(&mut nodes, &mut evs, ms(3) + cfg().retry_interval);
    for e in &evs {
        let o = finished(e).remove(0);
        assert_eq!(o.group, vec![id(A), id(B), id(C)]);
        assert_eq!(o.dropped, vec![id(A)]);
    }
}

#[test]
fn a_member_that_moved_on_costs_the_slowest_measured_round_not_the_retry_interval() {
    // The node's defaults: a 30 s reduce timeout, parts re-sent every 10 s.
    let config = AveragingConfig {
        reduce_timeout: Duration::from_secs(30),
        retry_interval: Duration::from_secs(10),
        adaptive_deadline: true,
        ..cfg()
    };
    // B and C see A, which sits the first rounds out.
    let mut nodes: Vec<Averager> = [B, C]
        .iter()
        .map(|&m| {
            let mut a = averager(id(m), config.clone());
            a.set_peers(&[id(A), id(B), id(C)]);
            a
        })
        .collect();
    let vals = pair_values();
    // Three complete rounds as a pair (closed on the join window) fit the
    // deadline to its 5 s floor.
    for round in 1..=3 {
        let at = Duration::from_secs(10 * round);
        for (n, v) in nodes.iter_mut().zip(&vals) {
            n.start_round(at, round, v.clone()).expect("start");
        }
        let mut evs = pump(&mut nodes, at);
        fire_until_all_finished(&mut nodes, &mut evs, at + secs(9));
        for e in &evs {
            let done = finished(e);
            assert!(done.len() == 1 && done[0].dropped.is_empty(), "{e:?}");
        }
    }
    assert_eq!(nodes[0].reduce_deadline(), deadline::FLOOR);
    // Round 4: A (the smallest id) forms a group with them, then joins
    // round 5 without a word. They stop waiting for its parts after the
    // slowest measured round (the 5 s floor over its factor of 4), not
    // after the 10 s re-send interval capped by the 5 s deadline.
    let at = |ms_in: u64| Duration::from_secs(40) + ms(ms_in);
    for (n, v) in nodes.iter_mut().zip(&vals) {
        n.start_round(at(0), 4, v.clone()).expect("start");
        n.handle_message(at(1), id(A), group(4, 3, vec![id(A), id(B), id(C)]));
    }
    let mut evs = pump(&mut nodes, at(1));
    for n in nodes.iter_mut() {
        n.handle_message(at(2), id(A), join(id(A), 5, 3));
    }
    evs.iter_mut()
        .zip(pump(&mut nodes, at(2)))
        .for_each(|(e, more)| e.extend(more));
    let grace = deadline::FLOOR / deadline::FACTOR;
    fire_until_all_finished(&mut nodes, &mut evs, at(2) + grace);
    for e in &evs {
        let done = finished(e);
        assert_eq!(done.len(), 1, "{e:?}");
        assert_eq!(done[0].dropped, vec![id(A)]);
    }
}

/// Join proofs bound to a scope that can change (as a pipeline node's
/// stage does), counting the checks made.
#[derive(Debug, Default)]
struct ScopedProofs {
    scope: std::sync::atomic::AtomicU64,
    checks: std::sync::atomic::AtomicUsize,
}

impl ScopedProofs {
    fn proof(&self, member: NodeId, round: u64, len: u64) -> Bytes {
        let scope = self.scope.load(std::sync::atomic::Ordering::Relaxed);
        OpenJoinProofs.attest(member, round ^ (scope << 48), len)
    }
}

impl JoinAttestor for std::sync::Arc<ScopedProofs> {
    fn attest(&self, me: NodeId, round: u64, len: u64) -> Bytes {
        self.proof(me, round, len)
    }

    fn verify(&self, member: NodeId, round: u64, len: u64, proof: &[u8]) -> bool {
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *proof == *self.proof(member, round, len)
    }

    fn sign_group(
        &self,
        me: NodeId,
        round: u64,
        len: u64,
        members: &[NodeId],
        proofs: &[Bytes],
    ) -> Bytes {
        OpenJoinProofs.sign_group(me, round, len, members, proofs)
    }

    fn verify_group(
        &self,
        leader: NodeId,
        round: u64,
        len: u64,
        members: &[NodeId],
        proofs: &[Bytes],
        signature: &[u8],
    ) -> bool {
        OpenJoinProofs.verify_group(leader, round, len, members, proofs, signature)
    }
}

#[test]
fn buffered_joins_of_another_scope_do_not_count_and_repeats_are_not_rechecked() {
    use std::sync::atomic::Ordering::Relaxed;
    let proofs = std::sync::Arc::new(ScopedProofs::default());
    let mut b = Averager::new(id(B), cfg(), Box::new(proofs.clone()));
    b.set_peers(&[id(A), id(B)]);
    // A's Join for round 1 is buffered; then our scope changes (a stage move).
    let a_join = AvgMessage::Join {
        round: 1,
        len: 2,
        proof: proofs.proof(id(A), 1, 2),
    };
    b.handle_message(ms(0), id(A), a_join);
    proofs.scope.store(1, Relaxed);
    b.set_peers(&[id(B)]);
    b.start_round(ms(1), 1, vec![1.0, 2.0]).expect("start");
    // A no longer counts: B leads itself and finishes alone at once,
    // instead of waiting for a Group from A.
    let evs = events(&mut b);
    let done = finished(&evs);
    assert_eq!(done.len(), 1, "{evs:?}");
    assert_eq!(done[0].group, vec![id(B)]);

    // In matchmaking (waiting for D), a re-broadcast Join is not checked
    // again, and a Join for a round we are past is not checked at all.
    b.set_peers(&[id(B), id(C), id(D)]);
    b.start_round(ms(2), 2, vec![1.0, 2.0]).expect("start");
    let c_join = AvgMessage::Join {
        round: 2,
        len: 2,
        proof: proofs.proof(id(C), 2, 2),
    };
    b.handle_message(ms(3), id(C), c_join.clone());
    let checks = proofs.checks.load(Relaxed);
    b.handle_message(ms(4), id(C), c_join);
    // (Round 1 we led, alone: its Join would be answered with our Group.)
    let old = AvgMessage::Join {
        round: 0,
        len: 2,
        proof: proofs.proof(id(C), 0, 2),
    };
    b.handle_message(ms(5), id(C), old);
    assert_eq!(proofs.checks.load(Relaxed), checks);
}

#[test]
fn a_listed_member_outside_our_view_is_not_waited_for() {
    // D joined A's round (A got its Join, its proof is valid), but none of
    // them can reach it: what they would send it goes nowhere, so they do
    // not wait for it and keep the part it reduces local at once.
    let mut nodes = swarm(&[A, B, C], &cfg());
    nodes[0].handle_message(ms(0), id(D), join(id(D), 1, 4));
    let vals = [
        vec![1.0f32, 2.0, 3.0, 4.0],
        vec![3.0, 4.0, 5.0, 6.0],
        vec![5.0, 6.0, 7.0, 8.0],
    ];
    for (n, v) in nodes.iter_mut().zip(&vals) {
        n.start_round(ms(1), 1, v.clone()).expect("start");
    }
    let evs = pump(&mut nodes, ms(1));
    for e in &evs {
        let done = finished(e);
        assert_eq!(done.len(), 1, "finished without waiting: {e:?}");
        assert_eq!(done[0].group, vec![id(A), id(B), id(C), id(D)]);
        assert_eq!(done[0].dropped, vec![id(D)]);
        assert_eq!(done[0].parts.iter().filter(|p| !p.averaged).count(), 1);
    }
}

#[test]
fn a_member_passes_on_a_group_its_leader_withheld() {
    // A leads [A, B, C] but its Group reaches B only (lost, or withheld by
    // a hostile leader, which then ignores C's repeated Joins). B hears C
    // still asking to join and passes the signed Group on: C follows it and
    // the three average the round, instead of B waiting for C until the
    // reduce deadline while C waits for a Group that never comes.
    let vals = [
        vec![1.0f32, 2.0, 3.0],
        vec![3.0, 4.0, 5.0],
        vec![9.0, 9.0, 9.0],
    ];
    let mut nodes = trio_in_round(1, &vals);
    let withheld =
        |from: usize, t: &Transmit| from == 0 && matches!(t.msg, AvgMessage::Group { .. });
    let (mut evs, held) = pump_holding(&mut nodes, ms(1), withheld);
    let from_a = held.first().expect("A closed its group").1.msg.clone();
    nodes[1].handle_message(ms(2), id(A), from_a);
    let mut now = ms(2);
    loop {
        let (more, _) = pump_holding(&mut nodes, now, withheld);
        for (e, m) in evs.iter_mut().zip(more) {
            e.extend(m);
        }
        if evs.iter().all(|e| finished(e).len() == 1) {
            break;
        }
        now = fire_next_timeout(&mut nodes);
        assert!(
            now < cfg().join_window,
            "nobody passed the Group on: {now:?}"
        );
    }
    let want = mean(&[&vals[0], &vals[1], &vals[2]]);
    for e in &evs {
        let done = finished(e);
        assert!(done[0].dropped.is_empty(), "{e:?}");
        assert_eq!(bits(&done[0].values), bits(&want));
    }
}

#[test]
fn a_group_without_its_leaders_signature_is_refused() {
    let mut c = node(C, &[A, B, C]);
    c.start_round(ms(0), 1, vec![1.0]).expect("start");
    let AvgMessage::Group {
        members, proofs, ..
    } = group(1, 1, vec![id(A), id(B), id(C)])
    else {
        unreachable!()
    };
    let unsigned = AvgMessage::Group {
        round: 1,
        len: 1,
        members,
        proofs,
        signature: Bytes::from(vec![0; 32]),
    };
    // Passed on by B: refused, and nothing else changes.
    c.handle_message(ms(1), id(B), unsigned.clone());
    assert_eq!(rejections(&events(&mut c)).len(), 1);
    assert_eq!(c.in_flight(), Some(1));
    assert!(c.sitting_out(2).is_empty());
    // Sent by A itself: refused as a forgery, A set aside and struck.
    c.handle_message(ms(2), id(A), unsigned);
    assert_eq!(rejections(&events(&mut c)).len(), 1);
    assert_eq!(c.in_flight(), Some(1));
    assert_eq!(c.sitting_out(2), vec![id(A)]);
}

#[test]
fn a_member_that_alters_a_group_it_passes_on_cannot_frame_its_leader() {
    let mut c = node(C, &[A, B, C]);
    c.start_round(ms(0), 1, vec![1.0]).expect("start");
    let genuine = group(1, 1, vec![id(A), id(B), id(C)]);
    let AvgMessage::Group {
        members,
        mut proofs,
        signature,
        ..
    } = genuine.clone()
    else {
        unreachable!()
    };
    // B swaps its own proof for a bad one and passes the Group on to C.
    proofs[1] = Bytes::from(vec![0; 32]);
    let altered = AvgMessage::Group {
        round: 1,
        len: 1,
        members,
        proofs,
        signature,
    };
    c.handle_message(ms(1), id(B), altered);
    assert_eq!(rejections(&events(&mut c)).len(), 1);
    assert!(c.sitting_out(2).is_empty(), "A is not blamed");
    assert_eq!(c.in_flight(), Some(1));
    // A's own Group is then followed.
    c.handle_message(ms(2), id(A), genuine);
    assert!(events(&mut c).contains(&AvgEvent::GroupFormed {
        round: 1,
        members: vec![id(A), id(B), id(C)]
    }));
}

/// Runs `rounds` rounds of A, B and C, each to its end on every node,
/// passing every transmit of node `i` through `rewrite(i, t)` (`None` loses
/// it); returns what each node's rounds ended with.
fn rounds_rewriting(
    nodes: &mut [Averager],
    rounds: std::ops::RangeInclusive<u64>,
    rewrite: impl Fn(usize, Transmit) -> Option<Transmit>,
) -> Vec<Vec<RoundOutcome>> {
    rounds_rewriting_into(nodes, rounds, |i, t| rewrite(i, t).into_iter().collect())
}

/// [`rounds_rewriting`] where one transmit may become several.
fn rounds_rewriting_into(
    nodes: &mut [Averager],
    rounds: std::ops::RangeInclusive<u64>,
    rewrite: impl Fn(usize, Transmit) -> Vec<Transmit>,
) -> Vec<Vec<RoundOutcome>> {
    let mut outcomes = vec![Vec::new(); nodes.len()];
    let mut now = ms(0);
    for round in rounds {
        for n in nodes.iter_mut() {
            n.start_round(now, round, vec![round as f32; 6]).unwrap();
        }
        loop {
            // Deliver until quiet, then fire the next timer, until every node is done.
            loop {
                let mut pending = Vec::new();
                for (i, n) in nodes.iter_mut().enumerate() {
                    pending.extend(
                        transmits(n)
                            .into_iter()
                            .flat_map(|t| rewrite(i, t))
                            .map(|t| (i, t)),
                    );
                    outcomes[i].extend(finished(&events(n)));
                }
                if pending.is_empty() {
                    break;
                }
                deliver(nodes, now, pending);
            }
            if nodes.iter().all(|n| n.in_flight().is_none()) {
                break;
            }
            now = fire_next_timeout(nodes);
        }
        now += ms(1_000);
    }
    outcomes
}

/// Node 0 (A, the leader) sends B the `Group` it formed and each of
/// `others` one of A and `others` only: a leader signing two Groups.
fn split_for_b(i: usize, t: Transmit, others: &[u8]) -> Vec<Transmit> {
    match t.msg {
        AvgMessage::Group { round, len, .. } if i == 0 => {
            let theirs: Vec<NodeId> = [A].iter().chain(others).map(|&m| id(m)).collect();
            let mut out = vec![Transmit {
                to: Destination::Peer(id(B)),
                msg: t.msg,
            }];
            out.extend(others.iter().map(|&m| Transmit {
                to: Destination::Peer(id(m)),
                msg: group(round, len, theirs.clone()),
            }));
            out
        }
        _ => vec![t],
    }
}

#[test]
fn a_leader_that_signs_two_groups_sits_out_instead_of_the_members_it_split() {
    // A (the smallest id) tells B the group is [A, B, C] and C that it is
    // [A, C]. B waits for C in vain and used to strike it every round, so
    // after two rounds B benched C while A stayed in. C shows B the Group it
    // follows when B's Part reaches it, and B sees A signed both.
    let mut nodes = swarm(&[A, B, C], &cfg());
    rounds_rewriting_into(&mut nodes, 1..=3, |i, t| split_for_b(i, t, &[C]));
    let b = &nodes[1];
    assert!(b.sitting_out(3).contains(&id(A)), "{:?}", b.sit_outs);
    for round in [3, 4] {
        assert!(!b.sitting_out(round).contains(&id(C)), "B benches C");
    }
    assert!(b.sit_outs.sits_out(id(A), 2), "not at once");
}

#[test]
fn every_member_that_follows_the_leaders_other_group_is_not_waited_for() {
    // A tells B the group is [A, B, C, D] and C and D that it is [A, C, D].
    // B learns of the second Group from C first; D shows it the same Group
    // later, and used to be waited for (and struck) all the same.
    const D: u8 = 4;
    let mut nodes = swarm(&[A, B, C, D], &cfg());
    let split = |i: usize, t: Transmit| split_for_b(i, t, &[C, D]);
    for n in nodes.iter_mut() {
        n.start_round(ms(0), 1, vec![1.0; 8]).unwrap();
    }
    // B's round ends once A's part and its own are in: C and D are not
    // waited for (before: D was, until the reduce deadline).
    let mut now = ms(0);
    let b_done = loop {
        let mut pending = Vec::new();
        let mut b_finished = false;
        for (i, n) in nodes.iter_mut().enumerate() {
            pending.extend(
                transmits(n)
                    .into_iter()
                    .flat_map(|t| split(i, t))
                    .map(|t| (i, t)),
            );
            b_finished |= i == 1 && !finished(&events(n)).is_empty();
        }
        if b_finished {
            break now;
        }
        if pending.is_empty() {
            now = fire_next_timeout(&mut nodes);
        } else {
            deliver(&mut nodes, now, pending);
        }
    };
    assert!(b_done < cfg().reducer_wait(), "B finished at {b_done:?}");
    assert!(nodes[1].sitting_out(2).contains(&id(A)));
}

#[test]
fn a_part_from_outside_our_group_that_came_before_it_is_answered_with_our_group() {
    // B's Part reaches C before C's Group does, and C's Group does not list B.
    let mut c = node(C, &[A, B, C]);
    c.start_round(ms(0), 1, vec![1.0; 6]).expect("start");
    let part = AvgMessage::Part {
        round: 1,
        part: 1,
        payload: Payload::from_f32(&[1.0; 3]),
    };
    c.handle_message(ms(1), id(B), part);
    transmits(&mut c);
    let ours = group(1, 6, vec![id(A), id(C)]);
    c.handle_message(ms(2), id(A), ours.clone());
    assert!(
        transmits(&mut c).contains(&Transmit {
            to: Destination::Peer(id(B)),
            msg: ours
        }),
        "B was not shown the Group C follows"
    );
}

#[test]
fn a_reducer_listing_only_itself_gets_no_honest_member_benched() {
    // C averages honestly but claims its parts hold only its own values. It
    // used to make A and B strike each other every round (as members missing
    // from C's parts), so after two rounds each sat the other out.
    let mut nodes = swarm(&[A, B, C], &cfg());
    let liar = |i: usize, t: Transmit| {
        Some(match t.msg {
            AvgMessage::Reduced {
                round,
                part,
                payload,
                ..
            } if i == 2 => Transmit {
                to: t.to,
                msg: AvgMessage::Reduced {
                    round,
                    part,
                    contributors: vec![id(C)],
                    payload,
                },
            },
            _ => t,
        })
    };
    let outcomes = rounds_rewriting(&mut nodes, 1..=6, liar);
    for (i, n) in nodes[..2].iter().enumerate() {
        assert!(
            n.sitting_out(7).is_empty(),
            "node {i} benches {:?}",
            n.sitting_out(7)
        );
        let groups: Vec<usize> = outcomes[i].iter().map(|o| o.group.len()).collect();
        assert_eq!(groups, vec![3; 6], "node {i}");
    }
}

#[test]
fn a_leader_that_never_sends_its_group_sits_out() {
    // A (the smallest id) joins every round but its Group never arrives: B
    // and C used to wait the whole group wait and finish alone, every round.
    let mut nodes = swarm(&[A, B, C], &cfg());
    let mute_leader = |i: usize, t: Transmit| {
        (!(i == 0 && matches!(t.msg, AvgMessage::Group { .. }))).then_some(t)
    };
    let outcomes = rounds_rewriting(&mut nodes, 1..=4, mute_leader);
    for i in 1..3 {
        let groups: Vec<Vec<NodeId>> = outcomes[i].iter().map(|o| o.group.clone()).collect();
        let alone = vec![nodes[i].me()];
        assert_eq!(
            groups,
            vec![alone.clone(), alone, vec![id(B), id(C)], vec![id(B), id(C)]],
            "node {i}: two strikes, then B and C average without A"
        );
        assert_eq!(nodes[i].sitting_out(4), vec![id(A)]);
    }
}

#[test]
fn a_member_that_leaves_during_the_all_reduce_is_not_waited_for_but_struck() {
    // C joins, the group forms, and C drops out of A's and B's view without
    // sending a tensor (crashed; or hostile, stalling the round and leaving
    // to dodge its strike), then comes back for the next round. Twice.
    let mut nodes = swarm(&[A, B, C], &cfg());
    let mut now = ms(0);
    for round in 1..=2u64 {
        for n in &mut nodes[..2] {
            n.set_peers(&[id(A), id(B), id(C)]);
        }
        for n in nodes.iter_mut() {
            n.start_round(now, round, vec![1.0; 6]).unwrap();
        }
        let evs = pump_losing(&mut nodes, now, |from, t| {
            from == 2 && matches!(t.msg, AvgMessage::Part { .. } | AvgMessage::Reduced { .. })
        });
        assert!(finished(&evs[0]).is_empty());
        for n in &mut nodes[..2] {
            n.set_peers(&[id(A), id(B)]);
        }
        // Not waited for: the round ends at once, not at a deadline.
        let mut evs = vec![Vec::new(); 2];
        fire_until_all_finished(&mut nodes[..2], &mut evs, now + ms(10));
        for (i, e) in evs.iter().enumerate() {
            let o = finished(e).pop().unwrap();
            assert_eq!(o.dropped, vec![id(C)], "node {i}");
        }
        // C's own round ends at its deadline.
        while nodes[2].in_flight().is_some() {
            now = fire_next_timeout(&mut nodes[2..]);
            transmits(&mut nodes[2]);
        }
        now += ms(1_000);
    }
    // It kept both rounds waiting for its tensors: two strikes, as for any
    // member that stalls, so it sits the next rounds out once it is back.
    for n in &mut nodes[..2] {
        n.set_peers(&[id(A), id(B), id(C)]);
        assert_eq!(n.sitting_out(3), vec![id(C)]);
    }
}

#[test]
fn a_reduced_part_is_sent_again_a_few_times_and_only_for_a_part() {
    let vals = [vec![1.0f32; 6], vec![2.0; 6], vec![3.0; 6]];
    let mut nodes = trio_in_round(1, &vals);
    // C's Reduced never arrives, so A, having reduced its own part (part
    // 0), is still in the round when B sends its Part for it again and again.
    pump_losing(&mut nodes, ms(1), |from, t| {
        from == 2 && matches!(t.msg, AvgMessage::Reduced { .. })
    });
    assert_eq!(nodes[0].in_flight(), Some(1));
    let part = |len: usize| AvgMessage::Part {
        round: 1,
        part: 0,
        payload: Payload::from_f32(&vec![2.0; len]),
    };
    let answers = |a: &mut Averager| {
        transmits(a)
            .iter()
            .filter(|t| matches!(t.msg, AvgMessage::Reduced { .. }))
            .count()
    };
    for _ in 0..50 {
        nodes[0].handle_message(ms(2), id(B), part(0));
    }
    assert_eq!(
        answers(&mut nodes[0]),
        0,
        "an empty Part is no Part of ours"
    );
    for _ in 0..50 {
        nodes[0].handle_message(ms(2), id(B), part(2));
    }
    assert_eq!(answers(&mut nodes[0]), 4);
    // So after the round, from what it keeps for late re-sends.
    while nodes.iter().any(|n| n.in_flight().is_some()) {
        let now = fire_next_timeout(&mut nodes);
        assert!(now <= secs(120));
        pump(&mut nodes, now);
    }
    for _ in 0..50 {
        nodes[0].handle_message(secs(121), id(C), part(2));
    }
    assert_eq!(answers(&mut nodes[0]), 4);
}

#[test]
fn a_peer_that_follows_a_leader_we_bench_is_not_blamed_for_its_silence() {
    // C sits A out (A forged a group, as C saw it); B does not, and follows
    // A's Group. To C the round's leader is B (the smallest id it counts),
    // which never sends a Group of its own: C gives up alone, but must not
    // strike B, whose silence A's Group explains.
    let mut nodes = swarm(&[A, B, C], &cfg());
    nodes[2].sit_outs.forged_group(id(A), 0);
    rounds_rewriting(&mut nodes, 1..=2, |_, t| Some(t));
    assert!(nodes[2].sit_outs.sits_out(id(A), 2));
    assert!(
        !nodes[2].sitting_out(3).contains(&id(B)),
        "C benches B: {:?}",
        nodes[2].sitting_out(3)
    );
}

#[test]
fn a_leader_that_joined_late_is_not_struck_for_a_group_it_had_no_time_to_send() {
    // A (the smallest id) joins just before B gives up: an honest leader
    // closes only at the end of its own join window.
    let mut b = node(B, &[A, B]);
    b.start_round(ms(0), 1, vec![4.0; 3]).expect("start");
    let give_up = b.group_wait();
    b.handle_message(give_up - ms(100), id(A), join(id(A), 1, 3));
    while b.in_flight().is_some() {
        let next = b.poll_timeout().expect("a timer while in flight");
        b.handle_timeout(next);
        transmits(&mut b);
    }
    assert_eq!(b.sit_outs, sitout::SitOuts::default(), "A was struck");
}
