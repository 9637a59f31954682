//! Which state the swarm vouches for.
//!
//! Every peer gossips a [`Claim`] (round, manifest root) after each round it
//! finishes. [`Vouches`] keeps each peer's last two claims (peers serve their
//! last two states, so a download of round r survives the swarm moving on to
//! r+1) and picks the state to download by this rule:
//!
//! - a peer vouches for each state it serves (its last two claims, so at
//!   most one per round);
//! - rounds are tried newest first; at a round, the root with the most
//!   vouchers wins if it has at least `min(min_vouchers, voters)` of them
//!   (voters: peers with any claim) and strictly more than every other root
//!   of that round;
//! - otherwise the next older round is tried.
//!
//! So one peer announcing a made-up state cannot outvote two honest ones, and
//! a swarm of one serving peer still lets a second peer join. A swarm whose
//! majority lies is out of scope (that needs the swarm secret and robust
//! aggregation, not a vote).

use super::Digest;
use crate::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Claims kept per peer: what it serves (its last two states).
const KEPT: usize = 2;

/// A peer's statement "I hold the state with this manifest root, the result of this round".
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    /// The averaging round the state is the result of (at least 1).
    pub round: u64,
    /// Its [`Manifest::root`](super::Manifest::root).
    pub root: Digest,
}

/// The state picked for download, with who vouched for it and who serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The vouched state.
    pub claim: Claim,
    /// Peers that vouch for it, which are the peers that serve it, sorted.
    pub vouchers: Vec<NodeId>,
}

/// Every peer's recent claims.
#[derive(Clone, Debug, Default)]
pub struct Vouches {
    claims: BTreeMap<NodeId, VecDeque<Claim>>,
}

impl Vouches {
    /// Records `peer`'s newest claim (a repeat of its latest is ignored; an
    /// older round than its latest is ignored too, since peers only move forward).
    pub fn record(&mut self, peer: NodeId, claim: Claim) {
        let q = self.claims.entry(peer).or_default();
        if q.back().is_some_and(|last| claim.round <= last.round) {
            return;
        }
        q.push_back(claim);
        while q.len() > KEPT {
            q.pop_front();
        }
    }

    /// Drops a peer that left: its vote and its chunks are gone.
    pub fn forget(&mut self, peer: &NodeId) {
        self.claims.remove(peer);
    }

    /// The newest round any peer claims (0 if none).
    pub fn newest_round(&self) -> u64 {
        self.claims
            .values()
            .filter_map(|q| q.back())
            .map(|c| c.round)
            .max()
            .unwrap_or(0)
    }

    /// The state of `round` that a node holding `ours` after that round
    /// should switch to: the one a strict majority of the swarm (`swarm`
    /// members, that node included) vouches for, if it is not `ours`. A node
    /// that saw a round only in part ends it on a model of its own; under
    /// DiLoCo nothing pulls it back, so it has to notice and download. A
    /// tie, or no majority, changes nothing (two nodes never swap models).
    pub fn realign_target(&self, round: u64, ours: &Digest, swarm: usize) -> Option<Choice> {
        let mut votes: BTreeMap<Digest, Vec<NodeId>> = BTreeMap::new();
        for (peer, q) in &self.claims {
            if let Some(c) = q.iter().find(|c| c.round == round) {
                votes.entry(c.root).or_default().push(*peer);
            }
        }
        let (root, vouchers) = votes.into_iter().max_by_key(|(_, v)| v.len())?;
        (root != *ours && vouchers.len() * 2 > swarm).then_some(Choice {
            claim: Claim { round, root },
            vouchers,
        })
    }

    /// Peers whose claims include `round`.
    pub fn voters_at(&self, round: u64) -> usize {
        self.claims
            .values()
            .filter(|q| q.iter().any(|c| c.round == round))
            .count()
    }

    /// Picks the state to download by the rule in the module docs, or `None`
    /// if no round has a clear winner yet.
    pub fn choose(&self, min_vouchers: usize) -> Option<Choice> {
        let mut votes: BTreeMap<(u64, Digest), Vec<NodeId>> = BTreeMap::new();
        for (peer, q) in &self.claims {
            for c in q {
                votes.entry((c.round, c.root)).or_default().push(*peer);
            }
        }
        let voters = self.claims.values().filter(|q| !q.is_empty()).count();
        let need = min_vouchers.clamp(1, voters.max(1));
        let mut rounds: Vec<u64> = votes.keys().map(|(r, _)| *r).collect();
        rounds.dedup();
        for round in rounds.into_iter().rev() {
            let mut at: Vec<(&Digest, &Vec<NodeId>)> = votes
                .iter()
                .filter(|((r, _), _)| *r == round)
                .map(|((_, root), peers)| (root, peers))
                .collect();
            at.sort_by_key(|e| std::cmp::Reverse(e.1.len()));
            let Some(&(root, vouchers)) = at.first() else {
                continue;
            };
            let clear = at
                .get(1)
                .is_none_or(|second| second.1.len() < vouchers.len());
            if vouchers.len() >= need && clear {
                let claim = Claim { round, root: *root };
                return Some(Choice {
                    claim,
                    vouchers: vouchers.clone(),
                });
            }
        }
        None
    }
}
