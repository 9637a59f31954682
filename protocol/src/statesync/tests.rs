//! Chunked download against honest, corrupt, slow and departed peers, in virtual time.

use super::*;
use crate::NodeId;
use std::collections::BTreeMap;
use std::time::Duration;

fn id(n: u8) -> NodeId {
    NodeId([n; 32])
}

/// The claim a peer serving `m` announces.
fn claim_of(m: &Manifest) -> Claim {
    Claim {
        round: m.round,
        root: m.root(),
    }
}

fn state(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Honest,
    /// Flips a byte of every chunk it serves.
    Corrupt,
    /// Never answers.
    Silent,
    /// Answers "not held".
    Gone,
    /// Sends a manifest of another state.
    WrongManifest,
    /// Sends the manifest, never a chunk.
    MuteOnChunks,
}

thread_local! {
    /// Chunk requests the last [`run`] on this thread sent.
    static CHUNKS_ASKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs a download against peers with the given behaviours; answers arrive
/// `latency` after the request. Returns the outcome, the events and the
/// virtual time it took.
fn run(
    bytes: &[u8],
    chunk: u32,
    peers: &[(NodeId, Behaviour)],
    config: DownloadConfig,
    latency: Duration,
) -> (
    Result<Downloaded, DownloadError>,
    Vec<DownloadEvent>,
    Duration,
) {
    let manifest = Manifest::build(7, 100, bytes, chunk);
    let other = Manifest::build(7, 100, &bytes[1..], chunk);
    let claim = claim_of(&manifest);
    let holders: Vec<NodeId> = peers.iter().map(|p| p.0).collect();
    let behaviour: BTreeMap<NodeId, Behaviour> = peers.iter().copied().collect();
    let mut now = Duration::ZERO;
    let mut d = Download::new(now, claim, &holders, config);
    // (arrival time, answer)
    let mut wire: Vec<(Duration, DownloadAction)> = Vec::new();
    let mut events = Vec::new();
    CHUNKS_ASKED.set(0);
    for _ in 0..10_000 {
        while let Some(a) = d.poll_action() {
            if matches!(a, DownloadAction::RequestChunk { .. }) {
                CHUNKS_ASKED.set(CHUNKS_ASKED.get() + 1);
            }
            wire.push((now + latency, a));
        }
        while let Some(e) = d.poll_event() {
            events.push(e);
        }
        if let Some(out) = d.outcome() {
            return (out, events, now);
        }
        wire.sort_by_key(|(t, _)| *t);
        // The first request its peer answers (by position: requests to a
        // silent peer may arrive at the same time).
        let next_answer = wire
            .iter()
            .position(|(_, a)| {
                let p = match a {
                    DownloadAction::RequestManifest { peer, .. }
                    | DownloadAction::RequestChunk { peer, .. } => peer,
                };
                let mute = matches!(a, DownloadAction::RequestChunk { .. })
                    && behaviour[p] == Behaviour::MuteOnChunks;
                behaviour[p] != Behaviour::Silent && !mute
            })
            .map(|pos| (pos, wire[pos].0));
        let timeout = d.poll_timeout().expect("running downloads have a timeout");
        match next_answer {
            Some((pos, t)) if t <= timeout => {
                let (_, action) = wire.remove(pos);
                now = t;
                match action {
                    DownloadAction::RequestManifest { peer, root } => {
                        assert_eq!(root, claim.root);
                        let m = match behaviour[&peer] {
                            Behaviour::Gone => None,
                            Behaviour::WrongManifest => Some(other.clone()),
                            _ => Some(manifest.clone()),
                        };
                        d.handle_manifest(now, peer, m);
                    }
                    DownloadAction::RequestChunk { peer, index, .. } => {
                        let mut data = bytes[manifest.chunk_range(index)].to_vec();
                        match behaviour[&peer] {
                            Behaviour::Gone => d.handle_chunk(now, peer, index, None),
                            Behaviour::Corrupt => {
                                data[0] ^= 1;
                                d.handle_chunk(now, peer, index, Some(&data))
                            }
                            _ => d.handle_chunk(now, peer, index, Some(&data)),
                        }
                    }
                }
            }
            _ => {
                wire.retain(|(t, _)| *t > timeout);
                now = timeout;
                d.handle_timeout(now);
            }
        }
    }
    panic!("download did not end");
}

/// Short limits for a download of `state`.
fn fast(state: &[u8]) -> DownloadConfig {
    DownloadConfig {
        request_timeout: Duration::from_secs(2),
        per_peer: 2,
        deadline: Duration::from_secs(60),
        expect_bytes: state.len() as u64,
    }
}

const MS: Duration = Duration::from_millis(10);

#[test]
fn honest_peers_share_the_chunks() {
    let bytes = state(10_000);
    let peers = [
        (id(1), Behaviour::Honest),
        (id(2), Behaviour::Honest),
        (id(3), Behaviour::Honest),
    ];
    let (out, _, took) = run(&bytes, 1024, &peers, fast(&bytes), MS);
    let got = out.unwrap();
    assert_eq!(got.bytes, bytes);
    assert_eq!(got.manifest.round, 7);
    assert_eq!(got.served_by.len(), 3, "{:?}", got.served_by);
    assert_eq!(got.served_by.values().sum::<u32>(), 10);
    assert!(got.avoided.is_empty());
    // 10 chunks, 6 in flight at a time, 10 ms each way: a few round trips.
    assert!(took <= MS * 4, "{took:?}");
}

#[test]
fn a_corrupt_peer_is_avoided_and_its_chunks_come_from_others() {
    let bytes = state(10_000);
    let peers = [
        (id(1), Behaviour::Honest),
        (id(2), Behaviour::Corrupt),
        (id(3), Behaviour::Honest),
    ];
    let (out, events, _) = run(&bytes, 1024, &peers, fast(&bytes), MS);
    let got = out.unwrap();
    assert_eq!(got.bytes, bytes);
    assert_eq!(got.avoided.get(&id(2)), Some(&Fault::Corrupt));
    assert!(!got.served_by.contains_key(&id(2)));
    assert_eq!(got.served_by.len(), 2);
    // Avoided once, and never asked again after that.
    let avoided_at = events
        .iter()
        .position(|e| matches!(e, DownloadEvent::Avoided { peer, .. } if *peer == id(2)))
        .unwrap();
    assert!(!events[avoided_at..]
        .iter()
        .any(|e| matches!(e, DownloadEvent::Chunk { from, .. } if *from == id(2))));
}

#[test]
fn a_silent_peer_costs_one_timeout() {
    let bytes = state(10_000);
    let peers = [
        (id(1), Behaviour::Silent),
        (id(2), Behaviour::Honest),
        (id(3), Behaviour::Honest),
    ];
    let (out, _, took) = run(&bytes, 1024, &peers, fast(&bytes), MS);
    let got = out.unwrap();
    assert_eq!(got.bytes, bytes);
    assert_eq!(got.avoided.get(&id(1)), Some(&Fault::Timeout));
    // id(1) is asked for the manifest first: one timeout, then the rest is fast.
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn chunks_a_silent_holder_was_asked_for_are_asked_again_once_each() {
    let bytes = state(10_000);
    let peers = [(id(1), Behaviour::MuteOnChunks), (id(2), Behaviour::Honest)];
    let (out, _, _) = run(&bytes, 1024, &peers, fast(&bytes), MS);
    let got = out.unwrap();
    assert_eq!(got.bytes, bytes);
    assert_eq!(got.avoided.get(&id(1)), Some(&Fault::Timeout));
    assert_eq!(got.served_by.values().sum::<u32>(), 10);
    // Its two requests in flight timed out together: each goes to the
    // honest holder once (one of them used to be queued, and asked, twice).
    assert_eq!(CHUNKS_ASKED.get(), 10 + 2);
}

#[test]
fn a_wrong_manifest_or_departed_peer_is_skipped() {
    let bytes = state(5_000);
    let peers = [
        (id(1), Behaviour::WrongManifest),
        (id(2), Behaviour::Gone),
        (id(3), Behaviour::Honest),
    ];
    let (out, _, _) = run(&bytes, 1024, &peers, fast(&bytes), MS);
    let got = out.unwrap();
    assert_eq!(got.bytes, bytes);
    assert_eq!(got.avoided.get(&id(1)), Some(&Fault::BadManifest));
    assert_eq!(got.avoided.get(&id(2)), Some(&Fault::NotHeld));
    assert_eq!(
        got.served_by.keys().copied().collect::<Vec<_>>(),
        vec![id(3)]
    );
}

#[test]
fn no_honest_peer_fails_with_no_peers() {
    let bytes = state(5_000);
    let peers = [(id(1), Behaviour::Corrupt), (id(2), Behaviour::Silent)];
    let (out, _, took) = run(&bytes, 1024, &peers, fast(&bytes), MS);
    assert!(
        matches!(out, Err(DownloadError::NoPeers { avoided: 2 })),
        "{out:?}"
    );
    assert!(took < Duration::from_secs(10));
    let (out, _, _) = run(&bytes, 1024, &[], fast(&bytes), MS);
    assert!(matches!(out, Err(DownloadError::NoPeers { avoided: 0 })));
}

#[test]
fn the_deadline_bounds_a_slow_download() {
    let bytes = state(5_000);
    let peers = [(id(1), Behaviour::Honest)];
    let config = DownloadConfig {
        deadline: Duration::from_millis(50),
        ..fast(&bytes)
    };
    // 100 ms per answer: the manifest alone misses the 50 ms deadline.
    let (out, _, took) = run(&bytes, 1024, &peers, config, MS * 10);
    assert_eq!(out, Err(DownloadError::Deadline(Duration::from_millis(50))));
    assert_eq!(took, Duration::from_millis(50));
}

#[test]
fn a_manifest_of_the_wrong_size_is_refused() {
    let bytes = state(5_000);
    let config = DownloadConfig {
        expect_bytes: 4_000,
        ..fast(&bytes)
    };
    let (out, _, _) = run(&bytes, 1024, &[(id(1), Behaviour::Honest)], config, MS);
    assert!(matches!(out, Err(DownloadError::NoPeers { .. })));
}

#[test]
fn answers_nobody_asked_for_are_ignored() {
    let bytes = state(3_000);
    let m = Manifest::build(2, 10, &bytes, 1024);
    let claim = claim_of(&m);
    let mut d = Download::new(Duration::ZERO, claim, &[id(1)], fast(&bytes));
    let first = d.poll_action().unwrap();
    assert_eq!(
        first,
        DownloadAction::RequestManifest {
            peer: id(1),
            root: claim.root
        }
    );
    // From a peer not asked: ignored, nobody avoided.
    d.handle_manifest(MS, id(9), Some(m.clone()));
    d.handle_chunk(MS, id(9), 0, Some(&bytes[m.chunk_range(0)]));
    assert!(d.poll_event().is_none());
    d.handle_manifest(MS, id(1), Some(m));
    assert!(matches!(
        d.poll_event(),
        Some(DownloadEvent::Manifest { chunks: 3, .. })
    ));
    // A chunk not requested from that peer (index 9 does not exist).
    d.handle_chunk(MS, id(1), 9, Some(&[1, 2, 3]));
    assert!(d.poll_event().is_none());
}

#[test]
fn a_download_stays_over_once_its_outcome_is_taken() {
    let bytes = state(1_000);
    let m = Manifest::build(2, 10, &bytes, 1024);
    let claim = claim_of(&m);
    // No deadline at all (Duration::MAX) must not overflow either.
    let config = DownloadConfig {
        deadline: Duration::MAX,
        request_timeout: Duration::MAX,
        ..fast(&bytes)
    };
    let holders = [id(1), id(2)];
    let mut d = Download::new(MS, claim, &holders, config);
    assert!(d.poll_action().is_some());
    d.handle_manifest(MS, id(1), Some(m.clone()));
    let Some(DownloadAction::RequestChunk { peer, index, .. }) = d.poll_action() else {
        panic!("no chunk asked for");
    };
    d.handle_chunk(MS, peer, index, Some(&bytes[m.chunk_range(index)]));
    assert!(d.is_finished());
    assert_eq!(d.outcome().unwrap().unwrap().bytes, bytes);
    // A holder leaving, or a timeout, after the outcome was taken: nothing
    // starts again, and no second outcome (of emptied bytes) appears.
    d.handle_peer_left(MS * 2, id(2));
    d.handle_timeout(MS * 3);
    assert!(d.is_finished());
    assert!(d.poll_action().is_none() && d.poll_timeout().is_none());
    assert!(d.outcome().is_none());
}

#[test]
fn a_vouched_manifest_whose_chunks_do_not_make_up_its_digest_is_refused() {
    // Peers vouched for this root, but its chunk digests belong to other
    // bytes than its state digest: chunks matching them would not be the
    // state the digest names.
    let bytes = state(5_000);
    let mut m = Manifest::build(2, 10, &bytes, 1024);
    m.chunks[3][0] ^= 1;
    assert!(m.validate().is_ok(), "sizes are all right");
    let claim = claim_of(&m);
    let mut d = Download::new(Duration::ZERO, claim, &[id(1)], fast(&bytes));
    assert!(matches!(
        d.poll_action(),
        Some(DownloadAction::RequestManifest { .. })
    ));
    d.handle_manifest(MS, id(1), Some(m));
    assert!(d.poll_action().is_none(), "no chunk is asked for");
    assert_eq!(
        d.poll_event(),
        Some(DownloadEvent::Avoided {
            peer: id(1),
            fault: Fault::BadManifest
        })
    );
    let out = d.outcome().expect("ended");
    assert_eq!(out, Err(DownloadError::NoPeers { avoided: 1 }));
}

#[test]
fn a_holder_that_leaves_hands_its_chunks_to_the_others_at_once() {
    let bytes = state(4_000);
    let m = Manifest::build(2, 10, &bytes, 1024);
    let claim = claim_of(&m);
    let mut d = Download::new(Duration::ZERO, claim, &[id(1), id(2)], fast(&bytes));
    assert!(matches!(
        d.poll_action(),
        Some(DownloadAction::RequestManifest { .. })
    ));
    d.handle_manifest(MS, id(1), Some(m.clone()));
    let mut asked: Vec<(NodeId, u32)> = Vec::new();
    while let Some(DownloadAction::RequestChunk { peer, index, .. }) = d.poll_action() {
        asked.push((peer, index));
    }
    assert_eq!(asked.len(), 4, "two per peer");
    // id(2) leaves: its two chunks go to id(1) as soon as it has room.
    d.handle_peer_left(MS * 2, id(2));
    assert!(d.poll_action().is_none(), "id(1) already has 2 in flight");
    for (peer, index) in asked.iter().filter(|(p, _)| *p == id(1)) {
        d.handle_chunk(MS * 3, *peer, *index, Some(&bytes[m.chunk_range(*index)]));
    }
    let mut again = Vec::new();
    while let Some(DownloadAction::RequestChunk { peer, index, .. }) = d.poll_action() {
        assert_eq!(peer, id(1));
        again.push(index);
    }
    for index in again {
        d.handle_chunk(MS * 4, id(1), index, Some(&bytes[m.chunk_range(index)]));
    }
    let got = d.outcome().unwrap().unwrap();
    assert_eq!(got.bytes, bytes);
    assert_eq!(got.avoided.get(&id(2)), Some(&Fault::Left));
    // Well before any request timeout.
    assert!(fast(&[]).request_timeout > MS * 4);
}

#[test]
fn manifest_root_binds_every_field_and_validate_checks_sizes() {
    let bytes = state(2_500);
    let m = Manifest::build(3, 40, &bytes, 1024);
    assert_eq!(m.num_chunks(), 3);
    assert_eq!(m.chunk_range(2), 2048..2500);
    assert!(m.validate().is_ok());
    assert!(m.chunk_matches(2, &bytes[2048..]));
    assert!(!m.chunk_matches(2, &bytes[2047..2499]));
    assert!(!m.chunk_matches(3, &[]));
    let root = m.root();
    let mut variants = vec![m.clone(); 6];
    variants[0].round += 1;
    variants[1].total_steps += 1;
    variants[2].total_bytes += 1;
    variants[3].chunk_bytes *= 2;
    variants[4].state_digest[0] ^= 1;
    variants[5].chunks[1][0] ^= 1;
    for v in &variants {
        assert_ne!(v.root(), root);
    }
    assert!(
        matches!(variants[2].validate(), Ok(())),
        "2501 bytes still 3 chunks"
    );
    // Digests that do not make up the state digest, whichever side is off.
    assert_eq!(m.check_digests(), Ok(()));
    for v in &variants[4..] {
        assert_eq!(v.check_digests(), Err(StateError::StateDigest));
    }
    let mut bad = m.clone();
    bad.chunks.pop();
    assert!(matches!(bad.validate(), Err(StateError::ChunkCount { .. })));
    for size in [0, 1000, 1025, MIN_CHUNK_BYTES / 2, MAX_CHUNK_BYTES * 2] {
        let mut bad = m.clone();
        bad.chunk_bytes = size;
        assert!(
            matches!(bad.validate(), Err(StateError::ChunkSize { .. })),
            "{size}"
        );
        // Never a panic, whatever the declared size: not even for data of the
        // length that size gives each chunk (which would reach the hashing).
        for index in 0..bad.num_chunks() {
            let data = bytes.get(bad.chunk_range(index)).unwrap_or_default();
            assert!(!bad.chunk_matches(index, data), "{size} chunk {index}");
        }
    }
}

#[test]
fn chunk_digests_make_up_the_blake3_of_the_whole_state() {
    // One chunk, several, a power of two of them and one more, a short last one.
    for (len, chunk) in [
        (0usize, 1024u32),
        (1, 1024),
        (1024, 1024),
        (1025, 1024),
        (4096, 1024),
        (5000, 1024),
        (64 * 1024 + 3, 4096),
        (300_000, CHUNK_BYTES),
    ] {
        let bytes = state(len);
        let m = Manifest::build(1, 1, &bytes, chunk);
        assert_eq!(
            m.state_digest,
            *blake3::hash(&bytes).as_bytes(),
            "{len}/{chunk}"
        );
        assert!(m.validate().is_ok(), "{len}/{chunk}");
        for index in 0..m.num_chunks() {
            let data = &bytes[m.chunk_range(index)];
            assert!(m.chunk_matches(index, data), "{len}/{chunk} chunk {index}");
            // Another chunk's bytes, or these at another place, do not match.
            if m.num_chunks() > 1 {
                let other = (index + 1) % m.num_chunks();
                assert!(!m.chunk_matches(other, data) || bytes[m.chunk_range(other)] == *data);
            }
        }
    }
    // Sizes off the power-of-two grid are rounded up to it.
    assert_eq!(Manifest::build(1, 1, &state(10), 1000).chunk_bytes, 1024);
    assert_eq!(
        Manifest::build(1, 1, &state(10), 0).chunk_bytes,
        MIN_CHUNK_BYTES
    );
    assert_eq!(
        Manifest::build(1, 1, &state(10), u32::MAX).chunk_bytes,
        MAX_CHUNK_BYTES
    );
}

#[test]
fn vouching_picks_the_majority_of_the_newest_round() {
    let (a, b) = ([1u8; 32], [2u8; 32]);
    let c = |round, root| Claim { round, root };
    let mut v = Vouches::default();
    assert_eq!(v.choose(2), None);
    // One peer alone: it is the whole swarm, so it suffices.
    v.record(id(1), c(3, a));
    assert_eq!(v.choose(2).unwrap().claim, c(3, a));
    // Two agree, one lies about the same round: the majority wins.
    v.record(id(2), c(3, a));
    v.record(id(3), c(3, b));
    let ch = v.choose(2).unwrap();
    assert_eq!(ch.claim, c(3, a));
    assert_eq!(ch.vouchers, vec![id(1), id(2)]);
    // A lone peer ahead does not reach the quorum of 2: round 3 still wins,
    // and the peer that moved on still vouches for (serves) round 3.
    v.record(id(1), c(4, b));
    let ch = v.choose(2).unwrap();
    assert_eq!(ch.claim, c(3, a));
    assert_eq!(ch.vouchers, vec![id(1), id(2)]);
    // A tie at the newest round is no decision; older rounds are tried.
    let mut v = Vouches::default();
    v.record(id(1), c(5, a));
    v.record(id(2), c(5, b));
    v.record(id(3), c(4, a));
    v.record(id(4), c(4, a));
    assert_eq!(v.choose(2).unwrap().claim, c(4, a));
    // Two more liars for round 5's b: now b is the clear winner there.
    v.record(id(5), c(5, b));
    v.record(id(6), c(5, b));
    assert_eq!(v.choose(2).unwrap().claim, c(5, b));
    v.forget(&id(5));
    v.forget(&id(6));
    // Old claims are ignored; a peer that leaves takes its vote along.
    v.record(id(3), c(2, b));
    assert_eq!(v.newest_round(), 5);
    v.forget(&id(3));
    v.forget(&id(4));
    assert_eq!(v.choose(2), None);
}

#[test]
fn a_node_off_the_majority_of_its_round_realigns_and_a_tie_changes_nothing() {
    let (mine, theirs) = ([1u8; 32], [2u8; 32]);
    let c = |round, root| Claim { round, root };
    let mut v = Vouches::default();
    v.record(id(1), c(4, theirs));
    // Two nodes (us and one peer) that differ: no majority, no swap.
    assert_eq!(v.realign_target(4, &mine, 2), None);
    // Three nodes: two vouch for another state of our round.
    v.record(id(2), c(4, theirs));
    assert_eq!(v.voters_at(4), 2);
    let t = v.realign_target(4, &mine, 3).unwrap();
    assert_eq!((t.claim, t.vouchers), (c(4, theirs), vec![id(1), id(2)]));
    // Already on the majority's state, or asked about another round: nothing.
    assert_eq!(v.realign_target(4, &theirs, 3), None);
    assert_eq!(v.realign_target(3, &mine, 3), None);
    // Five nodes, two vouchers: not a majority of the swarm.
    assert_eq!(v.realign_target(4, &mine, 5), None);
    // A peer that moved on still counts for the round it claimed before.
    v.record(id(1), c(5, mine));
    assert_eq!(v.voters_at(4), 2);
    assert!(v.realign_target(4, &mine, 3).is_some());
}
