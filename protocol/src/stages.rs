//! Which peers serve which pipeline stage, and which layers each stage holds.
//!
//! In pipeline (model-parallel) training the model's layer list is cut into `K` contiguous
//! stages ([`cut_layers`]); micro-batches flow from stage 0 to stage `K - 1`, and every stage
//! is served by one or more peers (replicas) that also average their parameters with each
//! other. [`assign`] decides which peer serves which stage. It is a pure function of the peer
//! set and the peers' quantized throughputs, so every peer evaluates it on its own view of the
//! swarm and peers whose views agree reach the same answer without talking.
//!
//! # How peers are assigned
//!
//! Every (peer, stage) pair gets a pseudo-random weight from blake3 (rendezvous hashing), which
//! gives each peer a fixed preference order over the stages that does not depend on who else
//! is in the swarm. Then:
//!
//! 1. **Counts.** Separately for each throughput class (peers with the same quantized
//!    throughput), among all assignments of that class whose replica counts differ by at most
//!    one between stages, take the one that keeps peers closest to their preferences: least
//!    total preference rank (so few peers off their first choice), ties broken by the hash
//!    weights. This is a min-cost flow with convex per-stage costs, solved exactly by
//!    successive shortest paths.
//! 2. **Throughput.** The classes' leftover peers can pile up on some stages, so: repeatedly
//!    move one peer into, or swap two peers with, the stage with the least summed throughput,
//!    as long as that makes the two stages involved more even, until no such move or swap
//!    exists. This also fills any stage step 1 left empty. With equal throughputs (one class)
//!    no such step exists, so step 1's answer stands.
//!
//! # Guarantees
//!
//! - **Every stage has a peer** when there are at least as many peers as stages; with fewer,
//!   [`assign`] fails with [`StageError::NotEnoughPeers`] (the driver waits for more peers).
//! - **Balance, equal throughputs:** replica counts differ by at most one (optimal: 4 peers on
//!   2 stages are 2 and 2, 8 peers on 3 stages are 3, 3 and 2).
//! - **Balance, any throughputs:** when step 2 ends, the slowest stage's summed throughput
//!   `T_min` and the fastest's `T_max` satisfy `T_max - T_min <= t`, where `t` is the
//!   throughput of the slowest peer in the fastest stage. Hence
//!   `T_min >= total / K - t_max * (K - 1) / K >= OPT - t_max`, where `OPT <= total / K` is the
//!   best achievable minimum and `t_max` the fastest peer's throughput. (Finding `OPT` itself
//!   is NP-hard; this is a local optimum.)
//! - **Stability, equal throughputs:** when one peer joins or leaves, at most `K - 1` *other*
//!   peers change stage, and usually none or one. Why: step 1's answer for a peer set `S + x`
//!   is step 1's answer for `S` plus one shortest augmenting path from `x` (the difference of
//!   two optimal flows that differ by one unit of supply is a single path when the optimum is
//!   unique, which the 64-bit hash weights make true except with negligible probability), and
//!   a shortest path visits each stage at most once, moving one peer out of each stage it
//!   passes through but the last.
//! - **Stability, mixed throughputs:** no proven bound (step 2 is a local search); the tests
//!   measure it. Quantize throughputs coarsely ([`Throughput::coarse`]) so that measurement
//!   noise does not reshuffle the pipeline.
//!
//! Cost: step 1 is `O(n^2 K + n K^3)` for `n` peers and `K` stages, step 2 `O(K n^2)` per
//! step for at most `8 n K + 64` steps (a safety cap; far fewer in practice). 256 peers on 16
//! stages take well under a second in a debug build; [`MAX_PEERS`] bounds the worst case.

use crate::NodeId;
use std::collections::BTreeMap;
use std::ops::Range;

/// Most peers [`assign`] accepts, so that one call's work stays bounded (see the module doc).
pub const MAX_PEERS: usize = 1024;

/// A peer's measured step throughput, quantized to an integer number of milli-units (for
/// example thousandths of a micro-batch per second), or unknown.
///
/// Integers rather than floats so that every peer, given the same gossiped values, computes
/// the same sums and the same assignment: float rounding cannot make peers disagree. The
/// measuring peer quantizes once, before it announces the value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Throughput(u32);

impl Throughput {
    /// Not measured yet (a newcomer). [`assign`] counts it as [`Throughput::DEFAULT_MILLI`].
    pub const UNKNOWN: Throughput = Throughput(0);

    /// What an unknown throughput counts as: 1.000 units. A fixed value rather than, say, the
    /// median of the known ones, so that one peer's measurement never changes how another
    /// peer is counted.
    pub const DEFAULT_MILLI: u32 = 1000;

    /// A throughput of `milli` thousandths of a unit; 0 means [`Throughput::UNKNOWN`].
    pub const fn from_milli(milli: u32) -> Throughput {
        Throughput(milli)
    }

    /// Quantizes a measured rate (units per second) to thousandths. Not finite or not positive
    /// gives [`Throughput::UNKNOWN`]; a positive rate below 0.0005 rounds up to 0.001 so that a
    /// measured peer is never taken for an unknown one; huge rates saturate.
    pub fn from_per_sec(rate: f64) -> Throughput {
        if !rate.is_finite() || rate <= 0.0 {
            return Throughput::UNKNOWN;
        }
        let milli = (rate * 1000.0).round();
        if milli >= f64::from(u32::MAX) {
            Throughput(u32::MAX)
        } else {
            // In 0..u32::MAX here, so the cast is exact.
            Throughput((milli as u32).max(1))
        }
    }

    /// The value in thousandths, or `None` if unknown.
    pub fn milli(self) -> Option<u32> {
        (self.0 != 0).then_some(self.0)
    }

    /// Rounds to 3 significant bits (1, 1.25, 1.5, 1.75 times a power of two; at most 12.5%
    /// off), so that peers whose speed fluctuates by a few percent keep announcing the same
    /// value and the assignment does not move peers around on noise. Unknown stays unknown.
    pub fn coarse(self) -> Throughput {
        if self.0 == 0 {
            return self;
        }
        let v = u64::from(self.0);
        let bits = 64 - v.leading_zeros();
        let shift = bits.saturating_sub(3);
        if shift == 0 {
            return self;
        }
        let half = 1u64 << (shift - 1);
        let rounded = ((v + half) >> shift) << shift;
        Throughput(u32::try_from(rounded).unwrap_or(u32::MAX).max(1))
    }

    /// The value [`assign`] balances with: unknown counts as [`Throughput::DEFAULT_MILLI`].
    pub fn effective(self) -> u64 {
        u64::from(self.milli().unwrap_or(Throughput::DEFAULT_MILLI))
    }
}

/// Why stages could not be cut or assigned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    /// Zero stages were asked for.
    #[error("a model cannot be cut into 0 stages: ask for at least 1")]
    NoStages,
    /// Fewer peers than stages: some stage would have nobody to serve it.
    #[error(
        "{peers} peers cannot serve {stages} stages: every stage needs at least one peer; \
         wait until {stages} peers are present"
    )]
    NotEnoughPeers {
        /// Peers given.
        peers: usize,
        /// Stages asked for.
        stages: usize,
    },
    /// Fewer layers than stages: some stage would hold no layer.
    #[error(
        "{layers} layers cannot be cut into {stages} stages: every stage needs at least one \
         layer; use at most {layers} stages"
    )]
    TooFewLayers {
        /// Layers in the model.
        layers: usize,
        /// Stages asked for.
        stages: usize,
    },
    /// More peers than [`MAX_PEERS`].
    #[error("{peers} peers are more than the {max} a stage assignment handles")]
    TooManyPeers {
        /// Peers given.
        peers: usize,
        /// The limit, [`MAX_PEERS`].
        max: usize,
    },
    /// The same peer twice in the input, which would make the answer depend on input order.
    #[error("peer {id} is listed more than once; list each peer once")]
    DuplicatePeer {
        /// The repeated peer.
        id: NodeId,
    },
}

/// Cuts `layers` layers into `stages` contiguous ranges covering `0..layers` in order, sizes
/// differing by at most one (the first `layers % stages` stages get the extra layer), so that
/// stages of a uniform stack do about equal work.
///
/// Fails if `stages` is 0 or greater than `layers` (a stage with no layer has nothing to do).
pub fn cut_layers(layers: usize, stages: usize) -> Result<Vec<Range<usize>>, StageError> {
    if stages == 0 {
        return Err(StageError::NoStages);
    }
    if stages > layers {
        return Err(StageError::TooFewLayers { layers, stages });
    }
    let (base, extra) = (layers / stages, layers % stages);
    let mut start = 0;
    Ok((0..stages)
        .map(|s| {
            let len = base + usize::from(s < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect())
}

/// Which peers serve which stage: the answer of [`assign`].
///
/// Compared with `==` to check that peers agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// Replicas of each stage, sorted by id.
    replicas: Vec<Vec<NodeId>>,
    /// Summed effective throughput of each stage.
    throughput: Vec<u64>,
    /// Stage of each peer.
    stage_of: BTreeMap<NodeId, usize>,
}

impl Assignment {
    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.replicas.len()
    }

    /// Number of peers assigned.
    pub fn peers(&self) -> usize {
        self.stage_of.len()
    }

    /// The stage `peer` serves, or `None` if it was not in the peer set: what a peer asks to
    /// know which parameters to hold.
    pub fn stage_of(&self, peer: NodeId) -> Option<usize> {
        self.stage_of.get(&peer).copied()
    }

    /// The replicas of `stage`, sorted by id (empty if `stage` is out of range): whom to send
    /// activations to, and whom to average with.
    pub fn replicas(&self, stage: usize) -> &[NodeId] {
        self.replicas.get(stage).map_or(&[], Vec::as_slice)
    }

    /// Summed effective throughput (milli-units, see [`Throughput::effective`]) of the
    /// replicas of `stage`, 0 if out of range: how fast that stage can go.
    pub fn stage_throughput(&self, stage: usize) -> u64 {
        self.throughput.get(stage).copied().unwrap_or(0)
    }

    /// The smallest stage throughput: the pace of the whole pipeline.
    pub fn min_throughput(&self) -> u64 {
        self.throughput.iter().copied().min().unwrap_or(0)
    }
}

/// The peers in both `old` and `new` whose stage differs, as `(peer, old stage, new stage)`,
/// sorted by id: the peers that must fetch another stage's parameters. Peers that joined or
/// left are not listed. Stage indices are compared as they are, even if the stage counts differ.
pub fn moved(old: &Assignment, new: &Assignment) -> Vec<(NodeId, usize, usize)> {
    old.stage_of
        .iter()
        .filter_map(|(id, &from)| {
            let to = new.stage_of(*id)?;
            (to != from).then_some((*id, from, to))
        })
        .collect()
}

/// Assigns every peer in `peers` to one of `stages` pipeline stages, balancing summed
/// throughput and keeping peers on their rendezvous-preferred stages where balance allows (see
/// the module doc for the method and its guarantees).
///
/// The answer depends only on the set of `(peer, throughput)` pairs, not on their order.
/// Fails if `stages` is 0, if there are fewer peers than stages, more than [`MAX_PEERS`], or a
/// peer listed twice.
pub fn assign(peers: &[(NodeId, Throughput)], stages: usize) -> Result<Assignment, StageError> {
    if stages == 0 {
        return Err(StageError::NoStages);
    }
    if peers.len() > MAX_PEERS {
        return Err(StageError::TooManyPeers {
            peers: peers.len(),
            max: MAX_PEERS,
        });
    }
    let mut sorted = peers.to_vec();
    sorted.sort_unstable_by_key(|(id, _)| *id);
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(StageError::DuplicatePeer { id: w[0].0 });
    }
    if sorted.len() < stages {
        return Err(StageError::NotEnoughPeers {
            peers: sorted.len(),
            stages,
        });
    }
    let cost: Vec<Vec<i128>> = sorted
        .iter()
        .map(|(id, _)| preference_costs(id, stages))
        .collect();
    let tput: Vec<u64> = sorted.iter().map(|(_, t)| t.effective()).collect();
    // Step 1 runs once per throughput class, so that each class spreads evenly on its own.
    let mut classes: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (p, &t) in tput.iter().enumerate() {
        classes.entry(t).or_default().push(p);
    }
    let mut at = vec![0usize; sorted.len()];
    for members in classes.values() {
        let class_cost: Vec<Vec<i128>> = members.iter().map(|&p| cost[p].clone()).collect();
        for (i, s) in balance_counts(&class_cost, stages).into_iter().enumerate() {
            at[members[i]] = s;
        }
    }
    balance_throughput(&mut at, &tput, &cost, stages);

    let mut replicas = vec![Vec::new(); stages];
    let mut throughput = vec![0u64; stages];
    let mut stage_of = BTreeMap::new();
    for (p, &s) in at.iter().enumerate() {
        // `sorted` is ascending, so each stage's list comes out sorted.
        replicas[s].push(sorted[p].0);
        throughput[s] += tput[p];
        stage_of.insert(sorted[p].0, s);
    }
    Ok(Assignment {
        replicas,
        throughput,
        stage_of,
    })
}

/// The rendezvous weight of `peer` for `stage`: 8 bytes of keyed blake3 of (peer id, stage).
/// It does not depend on the stage count, so a peer's preferences among the first `K` stages
/// are the same whatever `K` is.
fn weight(peer: &NodeId, stage: usize) -> u64 {
    let mut hasher = blake3::Hasher::new_derive_key("p2ptrain 2026 stages preference");
    hasher.update(&peer.0);
    hasher.update(&(stage as u64).to_le_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The cost of putting `peer` on each stage: its preference rank (0 = favourite) in the high
/// bits, the inverted weight below, so that the flow minimises peers off their favourites
/// first and the unique hash weights break every tie.
fn preference_costs(peer: &NodeId, stages: usize) -> Vec<i128> {
    let weights: Vec<u64> = (0..stages).map(|s| weight(peer, s)).collect();
    let mut order: Vec<usize> = (0..stages).collect();
    order.sort_unstable_by_key(|&s| (std::cmp::Reverse(weights[s]), s));
    let mut cost = vec![0i128; stages];
    for (rank, &s) in order.iter().enumerate() {
        cost[s] = ((rank as i128) << 64) + i128::from(u64::MAX - weights[s]);
    }
    cost
}

/// Marginal cost of a stage's `c`-th replica is `c * BALANCE`: larger than any possible
/// difference in total preference cost (below `MAX_PEERS * MAX_PEERS * 2^64 = 2^84`), so the
/// flow first evens out counts, then minimises preference cost. Totals stay below 2^107.
const BALANCE: i128 = 1 << 86;

/// Step 1 for one class: the count-balanced, preference-optimal assignment (stage of each
/// peer index; fewer peers than stages leave some stages empty), by
/// successive shortest paths. Each insertion adds one peer along a shortest augmenting path
/// through the stages (peer `p` at stage `a` moving to `b` costs `cost[p][b] - cost[p][a]`),
/// found by Bellman-Ford over the `K` stages; the result is the min-cost flow whatever the
/// insertion order.
fn balance_counts(cost: &[Vec<i128>], k: usize) -> Vec<usize> {
    let n = cost.len();
    let mut at = vec![0usize; n];
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); k];
    for x in 0..n {
        // Cheapest move out of each stage into each other stage, and who makes it.
        let mut arc: Vec<Option<(i128, usize)>> = vec![None; k * k];
        for (a, list) in members.iter().enumerate() {
            for &p in list {
                for b in (0..k).filter(|&b| b != a) {
                    let w = (cost[p][b] - cost[p][a], p);
                    let slot = &mut arc[a * k + b];
                    if slot.is_none_or(|best| w < best) {
                        *slot = Some(w);
                    }
                }
            }
        }
        let mut dist = cost[x].clone();
        let mut pred: Vec<Option<(usize, usize)>> = vec![None; k];
        for _ in 0..k {
            let mut changed = false;
            for a in 0..k {
                for b in 0..k {
                    if let Some((w, p)) = arc[a * k + b] {
                        if dist[a] + w < dist[b] {
                            dist[b] = dist[a] + w;
                            pred[b] = Some((a, p));
                            changed = true;
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let end = (0..k)
            .min_by_key(|&s| (dist[s] + BALANCE * (members[s].len() as i128 + 1), s))
            .unwrap_or(0);
        // Walk the path back: each predecessor's peer moves one stage along it.
        let mut b = end;
        for _ in 0..=k {
            match pred[b] {
                Some((a, p)) => {
                    members[a].retain(|&q| q != p);
                    members[b].push(p);
                    at[p] = b;
                    b = a;
                }
                None => break,
            }
        }
        members[b].push(x);
        at[x] = b;
        for list in &mut members {
            list.sort_unstable();
        }
    }
    at
}

/// One step of [`balance_throughput`]: move peer `.0` into the low stage, or swap it with
/// peer `.1` there.
#[derive(Clone, Copy)]
enum Step {
    Move(usize),
    Swap(usize, usize),
}

/// Step 2: evens out summed throughput. Repeatedly takes the lowest stage (by summed
/// throughput, then index) that some move into it or swap with it would make more even with
/// the other stage involved (that is, raise the smaller of the two sums, which keeps their
/// total), applies the best such step (the one leaving the two closest to even, then the one
/// costing the least preference, then the first in peer order), and stops when no stage has
/// one. Each step is a transfer from a richer to a poorer stage that does not overshoot, so
/// the sorted vector of stage sums rises lexicographically and the loop ends; the step cap is
/// only a safety net.
fn balance_throughput(at: &mut [usize], t: &[u64], cost: &[Vec<i128>], k: usize) {
    let n = at.len();
    let mut load = vec![0u64; k];
    let mut count = vec![0usize; k];
    for (p, &s) in at.iter().enumerate() {
        load[s] += t[p];
        count[s] += 1;
    }
    let cap = 8 * n * k + 64;
    'steps: for _ in 0..cap {
        let mut by_load: Vec<usize> = (0..k).collect();
        by_load.sort_unstable_by_key(|&s| (load[s], s));
        for &low in &by_load {
            // Best step into `low`: (new pair minimum, -preference cost increase), larger is better.
            let mut best: Option<((u64, i128), Step)> = None;
            let mut consider = |key: (u64, i128), step: Step| {
                if best.is_none_or(|(b, _)| key > b) {
                    best = Some((key, step));
                }
            };
            for p in 0..n {
                let high = at[p];
                if high == low {
                    continue;
                }
                let (l, h) = (load[low], load[high]);
                // Move p from `high` into `low`.
                if count[high] >= 2 {
                    let (l2, h2) = (l + t[p], h - t[p]);
                    if l2.min(h2) > l.min(h) {
                        consider((l2.min(h2), cost[p][high] - cost[p][low]), Step::Move(p));
                    }
                }
                // Swap p with a peer q of `low`.
                for q in (0..n).filter(|&q| at[q] == low && t[q] != t[p]) {
                    let (l2, h2) = (l - t[q] + t[p], h - t[p] + t[q]);
                    if l2.min(h2) > l.min(h) {
                        let dcost = cost[p][low] - cost[p][high] + cost[q][high] - cost[q][low];
                        consider((l2.min(h2), -dcost), Step::Swap(p, q));
                    }
                }
            }
            if let Some((_, step)) = best {
                match step {
                    Step::Move(p) => {
                        let high = at[p];
                        load[high] -= t[p];
                        count[high] -= 1;
                        load[low] += t[p];
                        count[low] += 1;
                        at[p] = low;
                    }
                    Step::Swap(p, q) => {
                        let high = at[p];
                        load[high] = load[high] - t[p] + t[q];
                        load[low] = load[low] - t[q] + t[p];
                        at[p] = low;
                        at[q] = high;
                    }
                }
                continue 'steps;
            }
        }
        break;
    }
}

/// Which replica should move, and where, when stages run empty mid-run: the first of `empty`
/// (stages that have been without a live replica long enough; the first stage, which the
/// run cannot go on without, sorts first) is refilled by the
/// highest-id replica of the stage with the most replicas, at least two (the later stage on
/// ties, so the first stage, which owns the data, gives last). `serving` lists
/// `(peer, stage)`. Every peer evaluates this on its own view; views that agree name one
/// mover per call, and a peer acts only when it is named. `None` when nothing is empty or no
/// stage can spare a replica.
pub fn spare_to_move(serving: &[(NodeId, usize)], empty: &[usize]) -> Option<(NodeId, usize)> {
    let target = *empty.first()?;
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for (_, stage) in serving {
        *counts.entry(*stage).or_default() += 1;
    }
    let (_, donor) = counts
        .iter()
        .map(|(stage, n)| (*n, *stage))
        .filter(|(n, stage)| *n >= 2 && *stage != target)
        .max()?;
    let mover = serving
        .iter()
        .filter(|(_, stage)| *stage == donor)
        .map(|(id, _)| *id)
        .max()?;
    Some((mover, target))
}

/// The stage a peer joining a pipeline already in progress should serve: the one in
/// `eligible` whose replicas' summed throughput is least (an empty stage first), ties broken
/// by fewer replicas, then the lower index. `current` lists `(stage, throughput)` of the
/// peers serving now. Incumbents stay where they are (moving a replica mid-run costs a
/// parameter transfer and its in-flight micro-batches), so the newcomer goes to the
/// bottleneck. A replica whose throughput is unknown counts as the median of the known ones
/// (as [`Throughput::DEFAULT_MILLI`] when none is known), so measured and unmeasured peers
/// are compared in the same units. `None` when `eligible` holds no stage below `stages`.
pub fn stage_to_join(
    current: &[(usize, Throughput)],
    stages: usize,
    eligible: Range<usize>,
) -> Option<usize> {
    let mut known: Vec<u64> = current
        .iter()
        .filter_map(|(_, t)| t.milli().map(u64::from))
        .collect();
    known.sort_unstable();
    let unknown = known
        .get(known.len() / 2)
        .copied()
        .unwrap_or(u64::from(Throughput::DEFAULT_MILLI));
    (eligible.start..eligible.end.min(stages)).min_by_key(|stage| {
        let replicas: Vec<u64> = current
            .iter()
            .filter(|(s, _)| s == stage)
            .map(|(_, t)| t.milli().map_or(unknown, u64::from))
            .collect();
        (replicas.iter().sum::<u64>(), replicas.len(), *stage)
    })
}

/// The stage a peer joining a pipeline already in progress takes: the first stage when it
/// has no replica left (nothing moves through the pipeline without it, and the peers of the
/// other stages hold its backup), otherwise the later stage [`stage_to_join`] names. A
/// joiner never adds itself to a first stage that is still served: the first stage's
/// replicas plan the run and split its data among themselves from the start.
pub fn stage_to_take(current: &[(usize, Throughput)], stages: usize) -> Option<usize> {
    if stages == 0 {
        return None;
    }
    if current.iter().all(|(stage, _)| *stage != 0) {
        return Some(0);
    }
    stage_to_join(current, stages, 1..stages)
}

#[cfg(test)]
#[path = "stages_sim.rs"]
mod sim_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn id(i: u64) -> NodeId {
        NodeId::from_key_bytes(format!("stage-peer-{i}").as_bytes())
    }

    fn equal(n: u64) -> Vec<(NodeId, Throughput)> {
        (0..n).map(|i| (id(i), Throughput::UNKNOWN)).collect()
    }

    fn counts(a: &Assignment) -> Vec<usize> {
        (0..a.stages()).map(|s| a.replicas(s).len()).collect()
    }

    /// Checks the invariants every assignment must satisfy, and the throughput balance bound.
    fn check(peers: &[(NodeId, Throughput)], k: usize, a: &Assignment) {
        assert_eq!(a.stages(), k);
        assert_eq!(a.peers(), peers.len());
        let mut total = 0;
        for s in 0..k {
            let r = a.replicas(s);
            assert!(!r.is_empty(), "stage {s} is empty");
            assert!(r.windows(2).all(|w| w[0] < w[1]), "replicas not sorted");
            let sum: u64 = r
                .iter()
                .map(|p| {
                    assert_eq!(a.stage_of(*p), Some(s));
                    peers
                        .iter()
                        .find(|(q, _)| q == p)
                        .map(|(_, t)| t.effective())
                        .unwrap_or(0)
                })
                .sum();
            assert_eq!(sum, a.stage_throughput(s));
            total += sum;
        }
        let t_max = peers.iter().map(|(_, t)| t.effective()).max().unwrap_or(0);
        // T_min >= total/K - t_max (K-1)/K, in integers.
        let min = a.min_throughput();
        assert!(
            min * k as u64 + t_max * (k as u64 - 1) >= total,
            "min {min} too low: total {total}, t_max {t_max}, K {k}"
        );
        let max = (0..k).map(|s| a.stage_throughput(s)).max().unwrap_or(0);
        // The fastest stage exceeds the slowest by at most its own slowest peer.
        let slowest_in_max = (0..k)
            .filter(|&s| a.stage_throughput(s) == max)
            .map(|s| {
                a.replicas(s)
                    .iter()
                    .map(|p| {
                        peers
                            .iter()
                            .find(|(q, _)| q == p)
                            .map_or(0, |(_, t)| t.effective())
                    })
                    .min()
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        assert!(
            max - min <= slowest_in_max,
            "max {max} min {min} {slowest_in_max}"
        );
    }

    #[test]
    fn equal_peers_spread_evenly() {
        let a = assign(&equal(4), 2).expect("assign");
        assert_eq!(counts(&a), vec![2, 2]);
        for (n, k) in [(8u64, 3usize), (7, 7), (64, 5), (10, 4), (3, 1), (100, 9)] {
            let peers = equal(n);
            let a = assign(&peers, k).expect("assign");
            check(&peers, k, &a);
            let c = counts(&a);
            let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(hi - lo <= 1, "n {n} k {k}: {c:?}");
            assert_eq!(a.min_throughput(), (n as usize / k) as u64 * 1000);
        }
    }

    #[test]
    fn one_fast_peer_serves_a_stage_alone() {
        // One peer 4x faster than four others, 2 stages: only {fast} vs {4 slow} reaches the
        // optimum minimum of 4, though counts alone would say 3 and 2.
        let mut peers: Vec<(NodeId, Throughput)> = (0..4)
            .map(|i| (id(i), Throughput::from_milli(1000)))
            .collect();
        peers.push((id(99), Throughput::from_milli(4000)));
        let a = assign(&peers, 2).expect("assign");
        check(&peers, 2, &a);
        assert_eq!(a.min_throughput(), 4000);
        let fast = a.stage_of(id(99)).expect("assigned");
        assert_eq!(a.replicas(fast), &[id(99)]);
        // Three stages, 4x peer plus eight 1x: total 12, a perfect 4/4/4 exists.
        let mut peers: Vec<(NodeId, Throughput)> = (0..8)
            .map(|i| (id(i), Throughput::from_milli(1000)))
            .collect();
        peers.push((id(99), Throughput::from_milli(4000)));
        let a = assign(&peers, 3).expect("assign");
        check(&peers, 3, &a);
        assert_eq!(a.min_throughput(), 4000);
    }

    #[test]
    fn the_answer_ignores_input_order() {
        let mut rng = Rng::new(11);
        for round in 0..50 {
            let n = rng.range(1..40);
            let k = rng.range(1..n + 1) as usize;
            let mut peers: Vec<(NodeId, Throughput)> = (0..n)
                .map(|i| {
                    let t = Throughput::from_milli(rng.range(0..5000) as u32);
                    (id(round * 1000 + i), t)
                })
                .collect();
            let a = assign(&peers, k).expect("assign");
            for _ in 0..3 {
                rng.shuffle(&mut peers);
                assert_eq!(assign(&peers, k).expect("assign"), a);
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(assign(&equal(3), 0), Err(StageError::NoStages));
        let e = assign(&equal(2), 3).expect_err("too few");
        assert_eq!(
            e,
            StageError::NotEnoughPeers {
                peers: 2,
                stages: 3
            }
        );
        assert!(
            e.to_string().contains("2 peers cannot serve 3 stages"),
            "{e}"
        );
        assert_eq!(
            assign(&[], 1),
            Err(StageError::NotEnoughPeers {
                peers: 0,
                stages: 1
            })
        );
        let mut dup = equal(3);
        dup.push((id(1), Throughput::from_milli(5)));
        let e = assign(&dup, 2).expect_err("duplicate");
        assert_eq!(e, StageError::DuplicatePeer { id: id(1) });
        assert!(e.to_string().contains(&id(1).to_string()), "{e}");
        let many = equal(MAX_PEERS as u64 + 1);
        assert!(matches!(
            assign(&many, 2),
            Err(StageError::TooManyPeers { .. })
        ));
    }

    #[test]
    fn cut_layers_covers_all_layers_evenly() {
        assert_eq!(cut_layers(10, 3), Ok(vec![0..4, 4..7, 7..10]));
        assert_eq!(cut_layers(4, 4), Ok(vec![0..1, 1..2, 2..3, 3..4]));
        let whole = cut_layers(5, 1).expect("cut");
        assert_eq!((whole.len(), &whole[0]), (1, &(0..5)));
        assert_eq!(cut_layers(5, 0), Err(StageError::NoStages));
        let e = cut_layers(2, 3).expect_err("too few layers");
        assert_eq!(
            e,
            StageError::TooFewLayers {
                layers: 2,
                stages: 3
            }
        );
        assert!(e
            .to_string()
            .contains("2 layers cannot be cut into 3 stages"));
        for layers in 1..40 {
            for stages in 1..=layers {
                let r = cut_layers(layers, stages).expect("cut");
                assert_eq!(r.len(), stages);
                assert_eq!(r[0].start, 0);
                assert_eq!(r[stages - 1].end, layers);
                assert!(r.windows(2).all(|w| w[0].end == w[1].start));
                let lens: Vec<usize> = r.iter().map(|x| x.len()).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(*lo >= 1 && hi - lo <= 1, "{layers}/{stages}: {lens:?}");
            }
        }
    }

    #[test]
    fn throughput_quantization() {
        assert_eq!(
            Throughput::from_per_sec(1.2345),
            Throughput::from_milli(1235)
        );
        assert_eq!(Throughput::from_per_sec(f64::NAN), Throughput::UNKNOWN);
        assert_eq!(Throughput::from_per_sec(-1.0), Throughput::UNKNOWN);
        assert_eq!(Throughput::from_per_sec(f64::INFINITY), Throughput::UNKNOWN);
        assert_eq!(Throughput::from_per_sec(1e-9), Throughput::from_milli(1));
        assert_eq!(
            Throughput::from_per_sec(1e30),
            Throughput::from_milli(u32::MAX)
        );
        assert_eq!(Throughput::UNKNOWN.effective(), 1000);
        assert_eq!(Throughput::default(), Throughput::UNKNOWN);
        assert_eq!(Throughput::from_milli(7).milli(), Some(7));
        // Coarse: 3 significant bits, within 12.5%, monotone, idempotent.
        assert_eq!(
            Throughput::from_milli(1000).coarse(),
            Throughput::from_milli(1024)
        );
        assert_eq!(
            Throughput::from_milli(5).coarse(),
            Throughput::from_milli(5)
        );
        assert_eq!(Throughput::UNKNOWN.coarse(), Throughput::UNKNOWN);
        let mut prev = 0;
        for v in (1..200_000u32).step_by(7).chain([u32::MAX - 1, u32::MAX]) {
            let c = Throughput::from_milli(v).coarse().milli().expect("known");
            let err = (f64::from(c) - f64::from(v)).abs() / f64::from(v);
            assert!(err <= 0.125 + 1e-9, "{v} -> {c}");
            assert!(c >= prev);
            prev = c;
            assert_eq!(Throughput::from_milli(c).coarse().milli(), Some(c));
        }
        // Noise of a few percent around 10.0 maps to one value.
        let a = Throughput::from_per_sec(10.0).coarse();
        assert_eq!(Throughput::from_per_sec(10.3).coarse(), a);
        assert_eq!(Throughput::from_per_sec(9.8).coarse(), a);
    }

    #[test]
    fn moved_lists_only_staying_peers_that_changed_stage() {
        let before = assign(&equal(6), 3).expect("assign");
        let after = assign(&equal(7), 3).expect("assign");
        let m = moved(&before, &after);
        assert!(m.windows(2).all(|w| w[0].0 < w[1].0));
        for (p, from, to) in &m {
            assert_eq!(before.stage_of(*p), Some(*from));
            assert_eq!(after.stage_of(*p), Some(*to));
            assert_ne!(from, to);
        }
        assert!(moved(&after, &after).is_empty());
        assert!(m.len() <= 2);
        assert!(
            !m.iter().any(|(p, _, _)| *p == id(6)),
            "the joiner is not 'moved'"
        );
    }

    /// Brute force over every assignment of tiny swarms: the local search keeps within its
    /// bound of the optimum, and equal throughputs reach the optimum.
    #[test]
    fn close_to_the_exact_optimum_on_small_swarms() {
        let mut rng = Rng::new(5);
        let (mut optimal, mut cases) = (0, 0);
        for round in 0..200 {
            let n = rng.range(1..8) as usize;
            let k = rng.range(1..n.min(4) as u64 + 1) as usize;
            let peers: Vec<(NodeId, Throughput)> = (0..n)
                .map(|i| {
                    let t = Throughput::from_milli(1000 * rng.range(1..9) as u32);
                    (id(round * 100 + i as u64), t)
                })
                .collect();
            let a = assign(&peers, k).expect("assign");
            check(&peers, k, &a);
            let t: Vec<u64> = peers.iter().map(|(_, t)| t.effective()).collect();
            let mut best = 0;
            let mut code = vec![0usize; n];
            loop {
                let mut sums = vec![0u64; k];
                for (p, &s) in code.iter().enumerate() {
                    sums[s] += t[p];
                }
                let cnt_ok = (0..k).all(|s| code.contains(&s));
                if cnt_ok {
                    best = best.max(sums.iter().copied().min().unwrap_or(0));
                }
                let mut i = 0;
                while i < n && code[i] == k - 1 {
                    code[i] = 0;
                    i += 1;
                }
                if i == n {
                    break;
                }
                code[i] += 1;
            }
            let t_max = t.iter().copied().max().unwrap_or(0);
            assert!(a.min_throughput() <= best);
            assert!(a.min_throughput() + t_max >= best, "round {round}");
            cases += 1;
            optimal += usize::from(a.min_throughput() == best);
        }
        // Measured: most random small swarms reach the exact optimum.
        assert!(optimal * 10 >= cases * 8, "{optimal}/{cases} optimal");
    }

    /// Property: over many random swarms with equal throughputs, one join or one leave moves at
    /// most K - 1 other peers (the proven bound), and on average about one or fewer for small K.
    /// Means measured at the time of writing: K=2 0.48, K=3 0.82, K=4 0.98, K=8 1.59.
    #[test]
    fn one_join_or_leave_moves_few_peers_with_equal_throughputs() {
        for (k, mean_limit) in [(2usize, 0.6), (3, 1.0), (4, 1.2), (8, 1.9)] {
            let mut rng = Rng::new(21);
            let (mut total_moves, mut events) = (0usize, 0usize);
            for round in 0..300u64 {
                let n = rng.range(k as u64 + 1..65);
                let peers: Vec<(NodeId, Throughput)> = (0..n)
                    .map(|i| (id(round * 1000 + i), Throughput::UNKNOWN))
                    .collect();
                let full = assign(&peers, k).expect("assign");
                let mut less = peers.clone();
                less.remove(rng.range(0..n) as usize);
                let fewer = assign(&less, k).expect("assign");
                let m = moved(&fewer, &full).len();
                assert!(m < k, "n {n} k {k}: {m} other peers moved");
                total_moves += m;
                events += 1;
            }
            let mean = total_moves as f64 / events as f64;
            assert!(
                mean <= mean_limit,
                "K {k}: mean moves per join/leave {mean}"
            );
        }
    }

    /// Mixed throughputs have no proven bound; this pins the measured behaviour so that a
    /// change to the method that makes churn much worse shows up.
    #[test]
    fn one_join_or_leave_with_mixed_throughputs_moves_a_few_peers() {
        let mut rng = Rng::new(33);
        let (mut total_moves, mut events) = (0usize, 0usize);
        for round in 0..200u64 {
            let n = rng.range(4..65);
            let k = rng.range(2..n.min(9)) as usize;
            let peers: Vec<(NodeId, Throughput)> = (0..n)
                .map(|i| {
                    let t = Throughput::from_milli(1000 << rng.range(0..3));
                    (id(round * 1000 + i), t)
                })
                .collect();
            let full = assign(&peers, k).expect("assign");
            check(&peers, k, &full);
            let mut less = peers.clone();
            less.remove(rng.range(0..n) as usize);
            let fewer = assign(&less, k).expect("assign");
            check(&less, k, &fewer);
            total_moves += moved(&fewer, &full).len();
            events += 1;
        }
        let mean = total_moves as f64 / events as f64;
        // Measured at the time of writing: 3.14 (swarms of 4 to 64 peers, 2 to 8 stages).
        assert!(mean <= 3.5, "mean moves per join/leave {mean}");
    }

    #[test]
    fn preferences_do_not_depend_on_stage_count() {
        // With as many stages as peers, each peer's stage comes from the same weights that a
        // bigger K would use: weights are per (peer, stage), not per K.
        assert_eq!(weight(&id(1), 2), weight(&id(1), 2));
        assert_ne!(weight(&id(1), 2), weight(&id(1), 3));
        let c3 = preference_costs(&id(1), 3);
        let c5 = preference_costs(&id(1), 5);
        let low = |c: &[i128]| {
            c.iter()
                .map(|x| x & i128::from(u64::MAX))
                .collect::<Vec<_>>()
        };
        assert_eq!(low(&c3), low(&c5)[..3].to_vec());
    }

    #[test]
    fn hundreds_of_peers_are_fast() {
        let mut rng = Rng::new(9);
        let peers: Vec<(NodeId, Throughput)> = (0..256)
            .map(|i| (id(i), Throughput::from_milli(rng.range(500..4000) as u32)))
            .collect();
        let start = std::time::Instant::now();
        let a = assign(&peers[..64], 16).expect("assign");
        check(&peers[..64], 16, &a);
        let b = assign(&peers, 16).expect("assign");
        check(&peers, 16, &b);
        assert!(start.elapsed().as_secs() < 5, "took {:?}", start.elapsed());
    }

    #[test]
    fn a_joiner_goes_to_the_empty_stage_then_the_slowest() {
        let t = Throughput::from_milli;
        // Stage 2 lost its replicas: it is filled first, whatever the speeds.
        let current = [(0, t(4000)), (1, t(4000)), (0, t(4000))];
        assert_eq!(stage_to_join(&current, 3, 1..3), Some(2));
        // Stage 1 has two slow replicas, stage 2 one fast one: stage 1 is the bottleneck.
        let current = [(0, t(9000)), (1, t(2000)), (1, t(2000)), (2, t(6000))];
        assert_eq!(stage_to_join(&current, 3, 1..3), Some(1));
        assert_eq!(stage_to_join(&current, 3, 0..3), Some(1));
        // Equal sums: fewer replicas, then the lower stage.
        let current = [(1, t(2000)), (1, t(2000)), (2, t(4000)), (3, t(4000))];
        assert_eq!(stage_to_join(&current, 4, 1..4), Some(2));
        assert_eq!(stage_to_join(&current, 4, 3..4), Some(3));
        assert_eq!(stage_to_join(&current, 4, 4..9), None);
    }

    #[test]
    fn unknown_throughputs_count_as_the_median_of_the_known_ones() {
        let t = Throughput::from_milli;
        // Stage 1: one unknown (counts as the median 5000) + 1000 = 6000; stage 2: 5500.
        let current = [
            (1, Throughput::UNKNOWN),
            (1, t(1000)),
            (2, t(5500)),
            (0, t(5000)),
            (0, t(9000)),
        ];
        assert_eq!(stage_to_join(&current, 3, 1..3), Some(2));
        // Nothing measured yet: replica counts decide.
        let current = [
            (1, Throughput::UNKNOWN),
            (2, Throughput::UNKNOWN),
            (2, Throughput::UNKNOWN),
        ];
        assert_eq!(stage_to_join(&current, 3, 1..3), Some(1));
    }

    #[test]
    fn the_highest_id_replica_of_the_fullest_stage_moves_to_the_first_empty_one() {
        let id = |n: u8| NodeId([n; 32]);
        let serving = [(id(1), 0), (id(7), 0), (id(3), 1), (id(4), 1), (id(9), 1)];
        assert_eq!(spare_to_move(&serving, &[2, 3]), Some((id(9), 2)));
        // Ties go to the later stage: the first stage keeps its data peers.
        let serving = [(id(1), 0), (id(7), 0), (id(3), 1), (id(4), 1)];
        assert_eq!(spare_to_move(&serving, &[2]), Some((id(4), 2)));
        // A single replica never leaves its stage; nothing empty, nothing moves.
        let serving = [(id(1), 0), (id(3), 1)];
        assert_eq!(spare_to_move(&serving, &[2]), None);
        assert_eq!(spare_to_move(&[(id(1), 0), (id(2), 0)], &[]), None);
        assert_eq!(
            spare_to_move(&[(id(1), 0), (id(2), 0)], &[1]),
            Some((id(2), 1))
        );
        // The first stage emptied: a later stage's spare refills it before anything else.
        let serving = [(id(3), 1), (id(8), 1), (id(5), 2)];
        assert_eq!(spare_to_move(&serving, &[0, 2]), Some((id(8), 0)));
        assert_eq!(spare_to_move(&[(id(3), 1)], &[0]), None);
    }

    #[test]
    fn a_joiner_takes_the_first_stage_only_when_it_has_no_replica() {
        let t = Throughput::from_milli;
        // The first stage is gone: a joiner takes it, even with a later stage empty too.
        assert_eq!(stage_to_take(&[(1, t(4000)), (1, t(100))], 3), Some(0));
        assert_eq!(stage_to_take(&[], 2), Some(0));
        // Served (however slowly): the joiner goes to the later bottleneck instead.
        let current = [(0, t(100)), (1, t(4000)), (2, t(5000))];
        assert_eq!(stage_to_take(&current, 3), Some(1));
        assert_eq!(stage_to_take(&[(0, t(100))], 2), Some(1));
        // One "stage": nothing later to join.
        assert_eq!(stage_to_take(&[(0, t(100))], 1), None);
        assert_eq!(stage_to_take(&[], 0), None);
    }
}
