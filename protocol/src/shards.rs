//! Which peer trains on which sample: rendezvous (highest-random-weight) hashing.
//!
//! Each (peer, sample) pair gets a pseudo-random weight from blake3; a sample belongs to the
//! peer with the highest weight. Every peer computes the same owners from the same peer set
//! without talking, and when a peer joins or leaves only the samples it wins or held move.

use crate::rng::Rng;
use crate::NodeId;

/// The weight of `peer` for `sample`: the first 8 bytes of blake3(peer id ‖ sample LE).
fn weight(peer: &NodeId, sample: u64) -> u64 {
    let mut input = [0u8; 40];
    input[..32].copy_from_slice(&peer.0);
    input[32..].copy_from_slice(&sample.to_le_bytes());
    let hash = blake3::hash(&input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The peer that trains on `sample`: the highest weight wins, a tie goes to the larger id.
/// `None` only if `peers` is empty.
pub fn owner(sample: u64, peers: &[NodeId]) -> Option<NodeId> {
    peers
        .iter()
        .map(|p| (weight(p, sample), *p))
        .max()
        .map(|(_, p)| p)
}

/// The samples in `0..num_samples` that `me` owns among `peers`, ascending. Empty if `me` is
/// not in `peers`.
pub fn shard_of(me: NodeId, peers: &[NodeId], num_samples: u64) -> Vec<u64> {
    if !peers.contains(&me) {
        return Vec::new();
    }
    let mut others: Vec<NodeId> = peers.iter().copied().filter(|p| *p != me).collect();
    others.sort_unstable();
    others.dedup();
    let expected = num_samples / (others.len() as u64 + 1);
    let mut mine = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
    for sample in 0..num_samples {
        let ours = (weight(&me, sample), me);
        // Most samples are lost to the first or second peer checked, so this stays cheap.
        if others.iter().all(|p| (weight(p, sample), *p) < ours) {
            mine.push(sample);
        }
    }
    mine
}

/// A seed for `me`'s sample order in `epoch`, mixed from the swarm seed, so orders differ per
/// epoch and per peer but are reproducible.
pub fn epoch_seed(swarm_seed: u64, epoch: u64, me: NodeId) -> u64 {
    let mut hasher = blake3::Hasher::new_derive_key("p2ptrain 2025 shards epoch seed");
    hasher.update(&swarm_seed.to_le_bytes());
    hasher.update(&epoch.to_le_bytes());
    hasher.update(&me.0);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The order in which to visit `shard` in the epoch with seed `seed` (a shuffled copy).
pub fn epoch_order(shard: &[u64], seed: u64) -> Vec<u64> {
    let mut order = shard.to_vec();
    Rng::new(seed).shuffle(&mut order);
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn peers(n: usize) -> Vec<NodeId> {
        (0..n)
            .map(|i| NodeId::from_key_bytes(format!("peer-{i}").as_bytes()))
            .collect()
    }

    fn owners(peers: &[NodeId], n: u64) -> Vec<NodeId> {
        (0..n)
            .map(|s| owner(s, peers).expect("non-empty peers"))
            .collect()
    }

    #[test]
    fn every_sample_has_exactly_one_owner_and_shards_agree_with_owner() {
        let ps = peers(16);
        let n = 60_000;
        let mut seen = vec![0u8; n as usize];
        let own = owners(&ps, n);
        for p in &ps {
            let shard = shard_of(*p, &ps, n);
            assert!(shard.windows(2).all(|w| w[0] < w[1]), "not ascending");
            for &s in &shard {
                seen[s as usize] += 1;
                assert_eq!(own[s as usize], *p);
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "a sample with 0 or 2+ owners");
    }

    #[test]
    fn shares_are_roughly_balanced() {
        let ps = peers(16);
        let mut counts: BTreeMap<NodeId, u64> = BTreeMap::new();
        for o in owners(&ps, 60_000) {
            *counts.entry(o).or_default() += 1;
        }
        assert_eq!(counts.len(), 16);
        // Mean 3750, binomial sd ~ 59: within +-10% is > 6 sd.
        for (p, c) in counts {
            assert!((3375..=4125).contains(&c), "{p} owns {c}");
        }
    }

    #[test]
    fn a_join_moves_samples_only_to_the_joiner() {
        let ps = peers(16);
        let n = 20_000;
        let before = owners(&ps[..15], n);
        let after = owners(&ps, n);
        let joiner = ps[15];
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if a != b {
                assert_eq!(*a, joiner, "sample moved to an old peer");
                moved += 1;
            }
        }
        // The joiner takes about 1/16.
        assert!((1000..1500).contains(&moved), "{moved}");
        assert_eq!(moved, shard_of(joiner, &ps, n).len());
    }

    #[test]
    fn a_leave_moves_only_the_leavers_samples() {
        let ps = peers(16);
        let n = 20_000;
        let before = owners(&ps, n);
        let leaver = ps[3];
        let rest: Vec<NodeId> = ps.iter().copied().filter(|p| *p != leaver).collect();
        let after = owners(&rest, n);
        for (b, a) in before.iter().zip(&after) {
            if *b != leaver {
                assert_eq!(a, b, "a sample of a staying peer moved");
            } else {
                assert_ne!(*a, leaver);
            }
        }
    }

    #[test]
    fn owner_is_order_independent_and_none_for_no_peers() {
        let mut ps = peers(5);
        let a = owners(&ps, 500);
        ps.reverse();
        assert_eq!(a, owners(&ps, 500));
        assert_eq!(owner(0, &[]), None);
        assert!(
            shard_of(peers(6)[5], &ps, 100).is_empty(),
            "me not in peers"
        );
    }

    #[test]
    fn duplicate_peers_do_not_change_ownership() {
        let ps = peers(4);
        let mut dup = ps.clone();
        dup.push(ps[0]);
        dup.push(ps[2]);
        assert_eq!(owners(&ps, 300), owners(&dup, 300));
        assert_eq!(shard_of(ps[0], &ps, 300), shard_of(ps[0], &dup, 300));
    }

    #[test]
    fn a_single_peer_owns_everything() {
        let ps = peers(1);
        assert_eq!(shard_of(ps[0], &ps, 10), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn epoch_seed_and_order_are_deterministic_and_vary() {
        let me = peers(1)[0];
        let other = peers(2)[1];
        let s = epoch_seed(1, 2, me);
        assert_eq!(s, epoch_seed(1, 2, me));
        assert_ne!(s, epoch_seed(1, 3, me));
        assert_ne!(s, epoch_seed(2, 2, me));
        assert_ne!(s, epoch_seed(1, 2, other));
        let shard: Vec<u64> = (0..50).map(|i| i * 3).collect();
        let order = epoch_order(&shard, s);
        assert_eq!(order, epoch_order(&shard, s));
        assert_ne!(order, epoch_order(&shard, epoch_seed(1, 3, me)));
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, shard);
    }

    #[test]
    fn shard_of_60k_samples_16_peers_is_fast() {
        let ps = peers(16);
        // Timing is reported by `cargo test`; this only guards against a pathological slowdown.
        let start = std::time::Instant::now();
        let total: usize = ps.iter().map(|p| shard_of(*p, &ps, 60_000).len()).sum();
        assert_eq!(total, 60_000);
        let per_peer = start.elapsed() / 16;
        assert!(
            per_peer.as_millis() < 500,
            "shard_of took {per_peer:?} per peer"
        );
    }
}
